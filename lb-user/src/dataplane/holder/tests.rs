//! The holder's side of a worker session over a socketpair.

use std::{
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

use super::{
    Holder, SEND_TIMEOUT, WatchConf,
    wire::{self, Closed, Ending, ToHolder, ToWorker, VERSION},
};
use crate::dataplane::watcher::Report as _;

fn pair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap()
}

/// A worker that stops reading (its reader busy, or itself blocked handing
/// connections over) stalls neither the holder's close watcher nor its
/// reader; it has its session ended once a send to it waited
/// `SEND_TIMEOUT`, so it restarts and counts again, and every close sent
/// before that reaches it in order.
#[test]
fn a_worker_that_does_not_read_stalls_no_holder_thread_and_has_its_session_ended() {
    let conf =
        WatchConf { idle: Duration::from_secs(60), queue: 0, slot: 0, beat: Duration::from_secs(1), packet: false };
    let holder = Arc::new(Holder::new(Vec::new(), None, conf).unwrap());
    let (holder_end, worker_end) = pair();
    // A small send buffer (the kernel doubles it): a few messages fill it.
    sockopt::set_socket_send_buffer_size(&holder_end, 32 * 1024).unwrap();
    sockopt::set_socket_timeout(&holder_end, sockopt::Timeout::Send, Some(SEND_TIMEOUT)).unwrap();
    let conn = Arc::new(holder_end);
    let h = holder.clone();
    let session = std::thread::spawn(move || h.session(&conn));
    wire::send(&worker_end, &ToHolder::Hello { version: VERSION, pid: 1 }, &[]).unwrap();
    assert!(matches!(wire::recv::<ToWorker>(&worker_end).unwrap(), Some((ToWorker::Welcome { .. }, _))));
    assert!(matches!(wire::recv::<ToWorker>(&worker_end).unwrap(), Some((ToWorker::LiveEnd, _))));
    // The worker reads nothing from here on; the watcher's closes go on.
    let mut reporter = holder.reporter();
    let mut id = 0;
    let flood = Instant::now();
    while flood.elapsed() < SEND_TIMEOUT / 2 {
        let round = Instant::now();
        for _ in 0..50 {
            id += 1;
            reporter.closed(Closed { id, bytes: [1, 2], how: Ending::Fin });
        }
        reporter.flush();
        let took = round.elapsed();
        assert!(took < Duration::from_millis(100), "a round of the close watcher waited {took:?} for the worker");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A send has waited `SEND_TIMEOUT` by now, or will soon: the session ends.
    let ended = (0..).map(|_| std::thread::sleep(Duration::from_millis(10))).take(500).find(|()| session.is_finished());
    assert!(ended.is_some(), "the holder kept a worker that took nothing for {:?}", 5 * SEND_TIMEOUT);
    assert!(session.join().unwrap().is_ok());
    // What was sent before comes first, in order, then the end of the link.
    let mut last = 0;
    loop {
        match wire::recv::<ToWorker>(&worker_end) {
            Ok(Some((ToWorker::Closed(batch), _))) => {
                for c in batch {
                    assert!(c.id > last, "close {} after {last}", c.id);
                    last = c.id;
                }
            }
            Ok(None) => break,
            other => panic!("after the closes, the end of the link; got {other:?}"),
        }
    }
    assert!(last > 0 && last < id, "{last} of {id} closes sent before the session ended");
}
