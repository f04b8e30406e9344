//! Unit tests of [`super`].

use super::*;
use crate::settings::Settings;
use netcluster_protocol::handover::Received;

fn incoming(generation: u64, workers: u32) -> (Incoming, Channel) {
    let (ours, old) = Channel::pair().expect("pair");
    let received = Received {
        pid: 1,
        generation,
        workers,
        listeners: Vec::new(),
    };
    (
        Incoming {
            channel: ours,
            received,
        },
        old,
    )
}

#[tokio::test]
async fn the_primary_taking_over_runs_the_next_generation_and_announces_later() {
    let (inc, _old) = incoming(4, 3);
    let mut settings = Settings::from_current_exe().expect("settings");
    settings.generation = 1;
    settings.workers = 1;
    inc.configure(&mut settings);
    assert_eq!(settings.generation, 5);
    assert_eq!(settings.workers, 3);
    assert!(!settings.announce_ready, "READY=1 waits for TakeOver");
}

#[tokio::test]
async fn an_abandoned_take_over_tells_the_old_primary_and_stops_the_cluster() {
    let (inc, old) = incoming(1, 1);
    let mut settings = Settings::from_current_exe().expect("settings");
    inc.configure(&mut settings);
    let mut cluster = crate::Cluster::new(settings);
    let err = inc.abandon(&cluster.handle(), "no workers").await;
    assert!(
        matches!(&err, Error::Upgrade(why) if why.ends_with("no workers")),
        "{err}"
    );
    let said = old.recv::<Handover>().await.expect("recv").map(|(m, _)| m);
    assert_eq!(
        said,
        Some(Handover::Failed {
            reason: "no workers".into()
        })
    );
    tokio::time::timeout(Duration::from_secs(10), cluster.wait())
        .await
        .expect("the cluster stops");
}

#[tokio::test]
async fn a_cluster_given_no_upgrader_refuses_an_upgrade() {
    let settings = Settings::from_current_exe().expect("settings");
    let cluster = crate::Cluster::new(settings);
    let handle = cluster.handle();
    let err = handle.upgrade().await.expect_err("no upgrader");
    assert!(
        matches!(&err, Error::Upgrade(why) if why.contains("not available")),
        "{err}"
    );
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn an_upgrade_without_a_binary_says_why_and_changes_nothing() {
    let settings = Settings::from_current_exe().expect("settings");
    let cluster = crate::Cluster::new(settings);
    cluster.set_upgrader(Upgrader::new(
        "/nonexistent/netcluster",
        Vec::new(),
        Duration::from_secs(1),
    ));
    let handle = cluster.handle();
    let err = handle.upgrade().await.expect_err("nothing to start");
    assert!(
        matches!(&err, Error::Upgrade(why) if why.contains("/nonexistent/netcluster")),
        "{err}"
    );
    let status = handle.status().await.expect("still serving");
    assert!(!status.stopping);
    handle.stop().await.expect("stop");
}

#[test]
fn the_invoked_path_is_kept_as_the_shell_found_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let v1 = dir.path().join("netcluster-v1");
    std::fs::write(&v1, "#!/bin/sh\n").expect("v1");
    std::fs::set_permissions(&v1, std::fs::Permissions::from_mode(0o755)).expect("mode");
    std::os::unix::fs::symlink(&v1, bin.join("netcluster")).expect("symlink");
    std::fs::write(bin.join("not-executable"), "x").expect("file");
    let cwd = std::path::Path::new("/srv/app");
    let path = std::env::join_paths(["/nonexistent".into(), bin.clone()]).expect("PATH");
    // Found on PATH: the symlink, not its target (an install switches the link).
    assert_eq!(
        invoked_path(Some(std::path::Path::new("netcluster")), Some(&path), cwd),
        Some(bin.join("netcluster"))
    );
    assert_eq!(
        invoked_path(
            Some(std::path::Path::new("not-executable")),
            Some(&path),
            cwd
        ),
        None
    );
    // A path: made absolute, `.` left out.
    assert_eq!(
        invoked_path(Some(std::path::Path::new("./netcluster")), None, cwd),
        Some(PathBuf::from("/srv/app/netcluster"))
    );
    assert_eq!(invoked_path(None, Some(&path), cwd), None);
}
