//! Unit tests of [`super`].

use super::*;

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
