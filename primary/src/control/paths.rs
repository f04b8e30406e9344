//! Where control sockets live: one per named instance, `NAME.sock`, in the user's runtime
//! directory.
//!
//! A primary puts its socket in the first of: `$XDG_RUNTIME_DIR/netcluster`, `/run/netcluster`
//! (root), `/tmp/netcluster-UID`. A client cannot know which environment the primary had (a
//! `systemd-socket-activate` clears `XDG_RUNTIME_DIR`, `sudo` and cron set their own), so it
//! tries every place a primary of this user may have used, in order: [`candidate_dirs`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::CONTROL_ENV;

/// The name of the instance when none is given.
pub const DEFAULT_NAME: &str = "default";

/// The file name of the default instance's socket before instances had names: a client
/// looking for [`DEFAULT_NAME`] also tries it, so that a new `netcluster upgrade` finds a
/// primary started by an older binary.
pub const LEGACY_SOCKET: &str = "control.sock";

/// The longest instance name.
pub const MAX_NAME: usize = 64;

/// Checks an instance name: 1 to [`MAX_NAME`] of `A-Z a-z 0-9 _ . -`, not `.` or `..`.
///
/// ```
/// use netcluster_primary::control::paths::check_name;
/// assert!(check_name("web-1").is_ok());
/// assert!(check_name("..").is_err());
/// assert!(check_name("a/b").is_err());
/// ```
///
/// # Errors
/// What is wrong with it, quoting it.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an instance name cannot be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "{name:?}: an instance name is at most {MAX_NAME} characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an instance name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?}: an instance name is letters, digits, '_', '.' and '-' (not {c:?})"
        ));
    }
    Ok(())
}

/// The effective uid of this process.
fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// The directory a primary of this process's environment puts its control socket in:
/// `$XDG_RUNTIME_DIR/netcluster`, else `/run/netcluster` for root, else `/tmp/netcluster-UID`.
pub fn server_dir() -> PathBuf {
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("netcluster");
    }
    if uid() == 0 {
        return PathBuf::from("/run/netcluster");
    }
    tmp_dir()
}

/// `/tmp/netcluster-UID`.
fn tmp_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/netcluster-{}", uid()))
}

/// Every directory a primary of this user may have put its socket in, in the order a client
/// tries them: `$XDG_RUNTIME_DIR/netcluster`, `/run/user/UID/netcluster`, `/run/netcluster`
/// (root), `/tmp/netcluster-UID`; each once.
pub fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        dirs.push(PathBuf::from(dir).join("netcluster"));
    }
    dirs.push(PathBuf::from(format!("/run/user/{}/netcluster", uid())));
    if uid() == 0 {
        dirs.push(PathBuf::from("/run/netcluster"));
    }
    dirs.push(tmp_dir());
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let new = !seen.contains(d);
        seen.push(d.clone());
        new
    });
    dirs
}

/// The socket of instance `name` in `dir`.
pub fn socket_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The instance name of a socket file in one of the [`candidate_dirs`]: `NAME` of `NAME.sock`.
pub fn name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let name = file.strip_suffix(".sock")?;
    check_name(name).ok()?;
    Some(name.to_string())
}

/// Where a control socket is, as the operator said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `--control PATH` or `$NETCLUSTER_CONTROL`: this path and no other.
    Path(PathBuf),
    /// `--name NAME` (or the default name): `NAME.sock` in the first of the
    /// [`candidate_dirs`] where a primary answers.
    Name(String),
}

impl Target {
    /// What the operator gave: `--control PATH`, else `--name NAME`, else
    /// `$NETCLUSTER_CONTROL`, else the name [`DEFAULT_NAME`].
    pub fn resolve(control: Option<&Path>, name: Option<&str>) -> Target {
        if let Some(path) = control {
            return Target::Path(path.to_path_buf());
        }
        if let Some(name) = name {
            return Target::Name(name.to_string());
        }
        if let Some(path) = env(CONTROL_ENV) {
            return Target::Path(PathBuf::from(path));
        }
        Target::Name(DEFAULT_NAME.to_string())
    }

    /// Where a primary serves this target: the path, or `NAME.sock` in [`server_dir`].
    pub fn server_path(&self) -> PathBuf {
        match self {
            Target::Path(p) => p.clone(),
            Target::Name(name) => socket_in(&server_dir(), name),
        }
    }

    /// The paths a client tries, in order (for the default name, each directory's
    /// [`LEGACY_SOCKET`] after `default.sock`).
    pub fn client_paths(&self) -> Vec<PathBuf> {
        match self {
            Target::Path(p) => vec![p.clone()],
            Target::Name(name) => {
                let mut paths = Vec::new();
                for dir in candidate_dirs() {
                    paths.push(socket_in(&dir, name));
                    if name == DEFAULT_NAME {
                        paths.push(dir.join(LEGACY_SOCKET));
                    }
                }
                paths
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["default", "web", "a.b", "A_b-9", &"x".repeat(MAX_NAME)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(MAX_NAME + 1),
            "a\0",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn socket_names() {
        assert_eq!(
            name_of(Path::new("/run/netcluster/web.sock")),
            Some("web".into())
        );
        assert_eq!(name_of(Path::new("/run/netcluster/web.sock.12.new")), None);
        assert_eq!(name_of(Path::new("/run/netcluster/.sock")), None);
        assert_eq!(socket_in(Path::new("/d"), "x"), PathBuf::from("/d/x.sock"));
    }

    #[test]
    fn targets() {
        let p = Path::new("/x/c.sock");
        assert_eq!(
            Target::resolve(Some(p), Some("n")),
            Target::Path(p.to_path_buf())
        );
        assert_eq!(Target::resolve(None, Some("n")), Target::Name("n".into()));
        let t = Target::Name("n".into());
        let paths = t.client_paths();
        assert!(paths.iter().all(|p| p.ends_with("n.sock")), "{paths:?}");
        assert!(paths.contains(&t.server_path()), "{paths:?}");
        assert!(
            paths.last().is_some_and(|p| p.starts_with("/tmp")),
            "{paths:?}"
        );
    }
}
