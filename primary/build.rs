//! Embeds the commit this crate is built from (`NETCLUSTER_COMMIT`: `git rev-parse --short
//! HEAD`), or `unknown` when it is not built from a git checkout (a tarball, a registry
//! download) or git is missing. A packager building from a tarball can set
//! `NETCLUSTER_COMMIT` in the build's environment to name the commit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=NETCLUSTER_COMMIT");
    // Only a checkout that holds this crate: a tarball unpacked inside some other repository
    // is not built from that repository's commit.
    let ours = git(&dir, &["ls-files", "--error-unmatch", "Cargo.toml"]).is_some();
    let commit = std::env::var("NETCLUSTER_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            ours.then(|| git(&dir, &["rev-parse", "--short", "HEAD"]))
                .flatten()
        })
        .unwrap_or_else(|| "unknown".to_string());
    if ours {
        // Build again when HEAD moves: HEAD itself (a checkout), the branch it points to (a
        // commit), and packed refs — those that exist (a missing one would rebuild every time).
        let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
        watch.extend(git(&dir, &["symbolic-ref", "-q", "HEAD"]));
        for name in watch {
            if let Some(path) = git(&dir, &["rev-parse", "--git-path", &name]) {
                let path = dir.join(path);
                if path.exists() {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=NETCLUSTER_COMMIT={commit}");
}
