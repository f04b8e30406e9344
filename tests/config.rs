//! The configuration file end to end: `netcluster serve --config FILE` runs what the file says
//! (flags over it), `netcluster check` says yes or exactly what is wrong and where, and the
//! shipped example and docs stay in step with the options. Also the command line's papercuts:
//! program options without a program, and options on the wrong side of `--`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use netcluster::config::ServeOptions;

const T: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Writes `text` to `dir/name`; its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the file");
    path
}

/// `netcluster ARGS` to completion: exit code, stdout, stderr.
fn netcluster(args: &[&str]) -> (Option<i32>, String, String) {
    let (status, out, err) = run_to_end(&netcluster_bin(), args, T);
    (status.code(), out, err)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[test]
fn serve_runs_what_the_file_says() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("from-the-file.sock");
    let file = write(
        dir.path(),
        "netcluster.toml",
        &format!(
            "workers = 2\n\
             listen = [\"web=127.0.0.1:0\", \"admin=127.0.0.1:0\"]\n\
             policy = \"shared\"\n\
             drain-timeout = 2\n\
             control = {:?}\n",
            path_str(&control)
        ),
    );
    let mut r = Running::start(&netcluster_bin(), &["serve", "--config", path_str(&file)]);
    let addr = listening_addr(&mut r);
    let status = eventually(T, "the primary on the file's control socket", || {
        try_status_at(&control)
            .filter(|s| s.workers.len() == 2 && s.workers.iter().all(|w| w.state == "listening"))
    });
    let names: Vec<&str> = status.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["web", "admin"]);
    assert_eq!(status.policy, "shared");
    assert_eq!(status.workers_wanted, 2);
    echo_request(addr, "configured by a file\n").expect("the echo app serves");
}

#[test]
fn a_program_with_its_arguments_comes_from_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let worker = repo("tests/programs/worker.py");
    let file = write(
        dir.path(),
        "netcluster.toml",
        &format!(
            "workers = 1\n\
             listen = [\"web=127.0.0.1:0\", \"admin=127.0.0.1:0\"]\n\
             no-prefix = true\n\
             stop-signal = \"TERM\"\n\
             command = [\"python3\", {:?}]\n",
            path_str(&worker)
        ),
    );
    let mut r = Running::start(&netcluster_bin(), &["serve", "--config", path_str(&file)]);
    let addr = listening_addr(&mut r);
    // `no-prefix`: the report line comes as the program printed it.
    let report = r.wait_stdout(T, |l| l.starts_with("report {"));
    assert!(report.contains("\"names\": \"web:admin\""), "{report}");
    let s = wait_listening(&r, 1);
    assert_eq!(s.workers[0].kind, "program");
    assert_eq!(s.policy, "reuseport", "a program's default");
    echo_request(addr, "a program from the file\n").expect("the program serves");
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        dir.path(),
        "netcluster.toml",
        "workers = 3\nlisten = [\"web=127.0.0.1:0\", \"admin=127.0.0.1:0\"]\n",
    );
    let mut r = Running::start(
        &netcluster_bin(),
        &[
            "serve",
            "--config",
            path_str(&file),
            "--workers",
            "1",
            "--listen",
            "only=127.0.0.1:0",
        ],
    );
    listening_addr(&mut r);
    let s = wait_listening(&r, 1);
    assert_eq!(s.workers_wanted, 1, "--workers over the file's 3");
    let names: Vec<&str> = s.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["only"], "a --listen flag replaces the file's list");
}

#[test]
fn serve_refuses_a_bad_file_before_it_binds_anything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        dir.path(),
        "bad.toml",
        "workers = 2\nlisten = \"127.0.0.1:70000\"\n",
    );
    let (code, out, err) = netcluster(&["serve", "--config", path_str(&file)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!out.contains("listening on"), "{out}");
    assert!(err.contains("bad.toml:2:10: key `listen`"), "{err}");
    assert!(err.contains("invalid port \"70000\""), "{err}");
}

#[test]
fn check_says_ok_in_one_line_and_binds_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("c.sock");
    let file = write(
        dir.path(),
        "ok.toml",
        &format!(
            "workers = 3\nlisten = [\"web=127.0.0.1:1\", \"admin=127.0.0.1:1\"]\ncontrol = {:?}\n",
            path_str(&control)
        ),
    );
    let (code, out, err) = netcluster(&["check", "--config", path_str(&file)]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with(&format!("{}: ok: ", path_str(&file))),
        "{out}"
    );
    assert!(lines[0].contains("3 workers"), "{out}");
    assert!(
        lines[0].contains("web=127.0.0.1:1 admin=127.0.0.1:1"),
        "{out}"
    );
    assert!(!control.exists(), "check made no control socket");
    // Flags are checked over the file, as serve takes them.
    let (code, _, err) = netcluster(&["check", "--config", path_str(&file), "--ready-after", "1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ready-after"), "{err}");
}

#[test]
fn check_names_the_file_the_line_the_key_and_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: [(&str, &str, &str); 5] = [
        (
            "workers = 2\nwrokers = 3\n",
            ":2:1: key `wrokers`",
            "unknown field",
        ),
        ("\n\nworkers = 0\n", ":3:11: key `workers`", "1 to 4096"),
        (
            "drain-timeout = \"soon\"\n",
            ":1:17: key `drain-timeout`",
            "not a number of seconds",
        ),
        (
            "workers = 2\nready-after = 1\n",
            ":2:1: key `ready-after`",
            "no program is given",
        ),
        (
            "command = [\"--workers\", \"2\"]\n",
            ":1:1: key `command`",
            "starts with '-'",
        ),
    ];
    for (i, (text, place, what)) in cases.into_iter().enumerate() {
        let file = write(dir.path(), &format!("case{i}.toml"), text);
        let (code, out, err) = netcluster(&["check", "--config", path_str(&file)]);
        assert_eq!(code, Some(2), "{text:?}: {err}");
        assert!(out.is_empty(), "{text:?}: {out}");
        let want = format!("netcluster: {}{place}: ", path_str(&file));
        assert!(err.starts_with(&want), "{text:?}: {err}");
        assert!(err.contains(what), "{text:?}: {err}");
    }
    let (code, _, err) = netcluster(&["check", "--config", "/nonexistent/netcluster.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("/nonexistent/netcluster.toml: cannot read it"),
        "{err}"
    );
}

#[test]
fn the_shipped_example_passes_check() {
    let example = repo("examples/netcluster.toml");
    let (code, out, err) = netcluster(&["check", "--config", path_str(&example)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(": ok: app echo, 4 workers"), "{out}");
}

#[test]
fn the_example_and_the_docs_name_every_key() {
    let example = std::fs::read_to_string(repo("examples/netcluster.toml")).expect("example");
    let docs = std::fs::read_to_string(repo("docs/operations.md")).expect("docs");
    for key in ServeOptions::KEYS {
        let key = key.replace('_', "-");
        let in_example = example
            .lines()
            .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = ")));
        assert!(in_example, "examples/netcluster.toml has no `{key} = …`");
        assert!(
            docs.contains(&format!("| `{key}` |")),
            "docs/operations.md has no row for `{key}`"
        );
    }
}

// The command line's papercuts.

#[test]
fn program_options_without_a_program_are_refused_not_ignored() {
    for (flag, value) in [
        ("--ready-after", Some("1")),
        ("--stop-signal", Some("INT")),
        ("--no-prefix", None),
        ("--native", None),
    ] {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", flag];
        args.extend(value);
        let (code, out, err) = netcluster(&args);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(!out.contains("listening on"), "{flag}: {out}");
        assert!(
            err.contains(&format!("netcluster: {flag}: ")),
            "{flag}: {err}"
        );
        assert!(err.contains("no program is given"), "{flag}: {err}");
    }
}

#[test]
fn a_mistyped_option_is_named_and_never_suggested_as_the_program() {
    let (code, _, err) = netcluster(&["serve", "--workrs", "2", "--", "python3", "app.py"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unexpected argument '--workrs'"), "{err}");
    assert!(err.contains("'--workers'"), "the similar option: {err}");
    assert!(!err.contains("use '-- --workrs'"), "clap's tip: {err}");
    assert!(err.contains("options go before `--`"), "{err}");
}

#[test]
fn an_option_after_the_double_dash_is_not_taken_for_the_program() {
    let (code, out, err) =
        netcluster(&["serve", "--listen", "127.0.0.1:0", "--", "--workers", "2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!out.contains("listening on"), "{out}");
    assert!(err.contains("\"--workers\" starts with '-'"), "{err}");
    assert!(err.contains("before `--`"), "{err}");
}

#[test]
fn the_readme_installs_with_the_lockfile() {
    // Without --locked, `cargo install` ignores Cargo.lock and builds against the newest
    // versions of every dependency: not what CI tested.
    let readme = std::fs::read_to_string(repo("README.md")).expect("README");
    assert!(
        readme.contains("cargo install --locked --path ."),
        "README's install line"
    );
    assert!(
        !readme.contains("cargo install --path"),
        "an install without --locked"
    );
}
