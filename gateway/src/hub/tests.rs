//! Unit tests of the hub: fan-out, the slow-consumer policy, lingering channels.

use tokio_util::sync::CancellationToken;

use super::{reaper::MIN_CAPACITY, *};

pub(super) fn hub(linger_ms: u64) -> Arc<Hub> {
    let defaults = crate::config::Config::default();
    let config = HubConfig {
        linger: Duration::from_millis(linger_ms),
        poll_buffer: 4,
        poll_keepalive: Duration::from_millis(0),
        ..HubConfig::new(&defaults)
    };
    Hub::in_memory(config, defaults.history)
}

pub(super) fn inbox(cap: usize) -> (Arc<Inbox>, InboxRx) {
    inbox_bytes(cap, usize::MAX)
}

fn inbox_bytes(cap: usize, bytes: usize) -> (Arc<Inbox>, InboxRx) {
    let limits = crate::config::Limits { queue_size: cap, queue_bytes: bytes, ..Default::default() };
    Inbox::new(ConnKind::Ws, &limits, CancellationToken::new())
}

#[test]
fn byte_budget_kicks_a_backlogged_inbox_and_counts_what_is_taken() {
    let hub = hub(0);
    let (slow, _rs) = inbox_bytes(100, 10);
    let (fast, mut rf) = inbox_bytes(100, 10);
    let _s1 = hub.subscribe("c", &slow);
    let _s2 = hub.subscribe("c", &fast);
    hub.dispatch("c", Bytes::from_static(b"0123456789abcdef"));
    assert_eq!(slow.kicked(), None, "an empty queue takes a message of any size");
    assert_eq!(fast.queued_bytes(), 16);
    assert_eq!(rf.try_recv().unwrap().data.len(), 16);
    assert_eq!(fast.queued_bytes(), 0, "taking a message frees its bytes");
    hub.dispatch("c", Bytes::from_static(b"x"));
    assert_eq!(slow.kicked(), Some(Kick::SlowConsumer), "16 queued + 1 > 10");
    assert_eq!(slow.queued_bytes(), 16, "the refused message is not counted");
    assert_eq!(fast.kicked(), None);
    assert_eq!(&rf.try_recv().unwrap().data[..], b"x");
}

#[test]
fn a_recovery_burst_is_queued_beyond_the_limits_and_uses_none_of_them() {
    let (inbox, mut rx) = inbox_bytes(2, 10);
    let delivery = |data: &'static str, catch_up: bool| {
        let mut d = Delivery::new("c".into(), None, None, Bytes::from_static(data.as_bytes()), 0, None);
        d.catch_up = catch_up;
        Arc::new(d)
    };
    for _ in 0..5 {
        assert!(inbox.offer(&delivery("0123456789ab", true)).is_ok(), "catch-up is never refused");
    }
    assert_eq!(inbox.queued_bytes(), 0, "catch-up bytes are not counted");
    assert!(inbox.offer(&delivery("x", false)).is_ok());
    assert!(inbox.offer(&delivery("y", false)).is_ok());
    assert!(matches!(inbox.offer(&delivery("z", false)), Err(Offer::Full("queue_messages"))));
    let got: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
    assert_eq!(got.len(), 7, "in order: the burst, then the live messages");
    assert_eq!(&got[6].data[..], b"y");
    assert!(inbox.offer(&delivery("z", false)).is_ok(), "taking them freed the live places");
}

#[test]
fn dispatch_shares_one_delivery_between_subscribers() {
    let hub = hub(0);
    let (a, mut ra) = inbox(8);
    let (b, mut rb) = inbox(8);
    let _sa = hub.subscribe("c", &a);
    let _sb = hub.subscribe("c", &b);
    hub.dispatch("c", Bytes::from_static(b"hi"));
    let (da, db) = (ra.try_recv().unwrap(), rb.try_recv().unwrap());
    assert!(Arc::ptr_eq(&da, &db));
    assert_eq!(&da.data[..], b"hi");
    hub.dispatch("other", Bytes::from_static(b"x"));
    assert!(ra.try_recv().is_none(), "no delivery for other channels");
}

#[test]
fn full_inbox_is_kicked_and_others_still_get_messages() {
    let hub = hub(0);
    let (slow, _rs) = inbox(2);
    let (fast, mut rf) = inbox(100);
    let _s1 = hub.subscribe("c", &slow);
    let _s2 = hub.subscribe("c", &fast);
    for i in 0..10 {
        hub.dispatch("c", Bytes::from(format!("m{i}")));
    }
    assert_eq!(slow.kicked(), Some(Kick::SlowConsumer));
    assert!(slow.closed().is_cancelled());
    let got: Vec<_> = std::iter::from_fn(|| rf.try_recv()).collect();
    assert_eq!(got.len(), 10);
    assert_eq!(&got[9].data[..], b"m9");
}

#[test]
fn empty_channels_linger_then_are_reaped() {
    let hub = hub(50);
    let (a, _ra) = inbox(8);
    let sub = hub.subscribe("c", &a);
    assert_eq!(hub.subscriber_count("c"), 1);
    drop(sub);
    assert_eq!(hub.reap(Instant::now()), 0, "still lingering");
    let sub = hub.subscribe("c", &a);
    assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 0, "came back in time");
    drop(sub);
    assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 1);
    assert_eq!(hub.subscriber_count("c"), 0);
}

#[test]
fn reaping_a_burst_of_channels_gives_their_table_space_back() {
    let hub = hub(0);
    let (a, _ra) = inbox(8);
    let subs: Vec<_> = (0..5000).map(|i| hub.subscribe(&format!("burst-{i}"), &a)).collect();
    let capacity =
        |hub: &Hub| hub.shards.iter().map(|s| s.lock().unwrap().channels.capacity()).sum::<usize>();
    assert!(capacity(&hub) >= 5000);
    drop(subs);
    assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 5000);
    assert!(capacity(&hub) <= SHARDS * 4 * MIN_CAPACITY, "kept {} slots for no channel", capacity(&hub));
    let _again = hub.subscribe("burst-0", &a);
    assert_eq!(hub.subscriber_count("burst-0"), 1, "a shrunk shard still takes channels");
}

/// Publishes one history message to `channel` through the hub; its position.
async fn history_message(hub: &Hub, channel: &str) -> shared::StreamPos {
    let msg = Publish {
        channel: channel.into(),
        data: Bytes::from_static(b"m"),
        history: true,
        ..Default::default()
    };
    hub.publish(msg).await.unwrap().id.unwrap().parse().unwrap()
}

/// The head recorded for `channel` on this node, if any.
fn head_of(hub: &Hub, channel: &str) -> Option<shared::StreamPos> {
    hub.shard(channel).channels.get(channel).and_then(|c| c.head)
}

#[tokio::test]
async fn a_burst_of_new_channels_reads_every_head_with_a_few_tasks() {
    let hub = hub(0);
    let (a, _ra) = inbox(8);
    let mut positions = Vec::new();
    for i in 0..300 {
        positions.push(history_message(&hub, &format!("heads-{i}")).await);
    }
    // Subscribed in one go, without yielding: the reads are queued, not spawned each.
    let subs: Vec<_> = (0..300).map(|i| hub.subscribe(&format!("heads-{i}"), &a)).collect();
    assert!(hub.heads.lock().workers <= heads::WORKERS, "at most a few tasks read heads");
    tokio::time::timeout(Duration::from_secs(5), async {
        while (0..300).any(|i| head_of(&hub, &format!("heads-{i}")).is_none()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every head read");
    for (i, pos) in positions.iter().enumerate() {
        assert_eq!(head_of(&hub, &format!("heads-{i}")), Some(*pos));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(hub.heads.lock().workers, 0, "the tasks end with the queue");
    assert!(hub.heads.lock().todo.is_empty());
    drop(subs);
}

#[tokio::test]
async fn a_channel_subscribed_again_before_its_turn_gets_its_head() {
    let hub = hub(0);
    let (a, _ra) = inbox(8);
    history_message(&hub, "gone").await;
    // Subscribed and reaped before the (not yet started) task runs.
    drop(hub.subscribe("gone", &a));
    assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 1);
    let again = hub.subscribe("gone", &a);
    let pos = history_message(&hub, "gone").await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while head_of(&hub, "gone").is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the live channel's head is read");
    assert_eq!(head_of(&hub, "gone"), Some(pos), "read for the channel subscribed now");
    drop(again);
}
