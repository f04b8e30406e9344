//! `netcluster ls`: the running primaries of this user, as a table or as JSON.

use std::fmt::Write as _;

use crate::cluster::control::Found;

/// Workers ready (listening on every listener) of a status.
fn ready(status: &crate::cluster::Status) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == "listening")
        .count()
}

/// The table `netcluster ls` prints: one row per primary that answered; the sockets nobody
/// answers on (stale) are counted in a footnote, or listed when `verbose`; other failures
/// (another user's socket, no permission) are always listed.
pub fn table(found: &[Found], verbose: bool) -> String {
    let mut out = String::new();
    let live: Vec<_> = found
        .iter()
        .filter_map(|f| f.answer.as_ref().ok().map(|s| (f, s)))
        .collect();
    if live.is_empty() {
        let _ = writeln!(out, "no running primary found");
    } else {
        let width = live
            .iter()
            .map(|(f, _)| f.name.len())
            .max()
            .unwrap_or(0)
            .max(16);
        let _ = writeln!(
            out,
            "{:<width$} {:>8} {:<24} {:<12} {:>7} {:>4}  {:<30} SOCKET",
            "NAME", "PID", "VERSION", "POLICY", "WORKERS", "GEN", "LISTENERS"
        );
        for (f, s) in live {
            let listeners: Vec<&str> = s.listeners.iter().map(|l| l.address.as_str()).collect();
            let _ = writeln!(
                out,
                "{:<width$} {:>8} {:<24} {:<12} {:>7} {:>4}  {:<30} {}",
                f.name,
                s.pid,
                s.version_text().unwrap_or_else(|| "?".into()),
                s.policy,
                format!("{}/{}", ready(s), s.workers_wanted),
                s.generation,
                listeners.join(","),
                f.path.display()
            );
        }
    }
    let stale: Vec<&Found> = found.iter().filter(|f| f.is_stale()).collect();
    if verbose {
        for f in &stale {
            let _ = writeln!(
                out,
                "stale: {} (nobody answers; a primary that died left it)",
                f.path.display()
            );
        }
    } else if !stale.is_empty() {
        let _ = writeln!(
            out,
            "({} stale socket{} skipped: nobody answers; -v lists them)",
            stale.len(),
            if stale.len() == 1 { "" } else { "s" }
        );
    }
    for f in found.iter().filter(|f| !f.is_stale()) {
        if let Err(e) = &f.answer {
            let _ = writeln!(out, "skipped {}: {e}", f.path.display());
        }
    }
    out
}

/// The JSON `netcluster ls --json` prints: `{"primaries": [...], "skipped": [...]}`, each
/// primary with `name`, `socket`, `pid`, `version`, `commit`, `policy`, `workers_ready`,
/// `workers_wanted`, `generation` and `listeners` (addresses); each skipped socket with
/// `socket`, `stale` and `error`.
pub fn json(found: &[Found]) -> serde_json::Value {
    let mut primaries = Vec::new();
    let mut skipped = Vec::new();
    for f in found {
        match &f.answer {
            Ok(s) => primaries.push(serde_json::json!({
                "name": f.name,
                "socket": f.path,
                "pid": s.pid,
                "version": s.version,
                "commit": s.commit,
                "policy": s.policy,
                "workers_ready": ready(s),
                "workers_wanted": s.workers_wanted,
                "generation": s.generation,
                "listeners": s.listeners.iter().map(|l| l.address.as_str()).collect::<Vec<_>>(),
            })),
            Err(e) => skipped.push(serde_json::json!({
                "name": f.name,
                "socket": f.path,
                "stale": f.is_stale(),
                "error": e.to_string(),
            })),
        }
    }
    serde_json::json!({ "primaries": primaries, "skipped": skipped })
}
