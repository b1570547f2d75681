//! The worker's side of the packet plane: a spliced connection of a
//! packet-plane frontend is joined ([`super::join`]) and handed to the
//! slot's holder as a joined connection, or, kept on the sockmap plane,
//! handed over with its sockets like any other.

use std::sync::{Arc, Mutex};

use super::holder::{link::Link, wire::Held};
use crate::{
    kernel::{flows::FlowMaps, maps::ConnMaps},
    observe::{conn::ConnGuard, counters::Counters},
};

/// The packet plane, as one worker uses it.
pub(super) struct Packet {
    pub flows: Mutex<FlowMaps>,
    /// Grace periods after the joins' map writes.
    pub grace: crate::kernel::grace::Grace,
    /// Per frontend (config order): whether it joins its connections.
    pub frontends: Vec<bool>,
}

/// [`KernelDataplane::hold`], for a join that keeps its connection.
#[allow(clippy::too_many_arguments)]
pub(super) fn hold(
    link: &Link,
    maps: &Mutex<ConnMaps>,
    failures: &Mutex<crate::observe::Every>,
    held: Held,
    guard: ConnGuard,
    socks: [std::net::TcpStream; 2],
    cookies: [u64; 2],
) {
    match link.hold(held, guard, socks) {
        Ok(()) => {}
        Err((guard, socks, e)) => {
            // The holder's queue is full or too many descriptors are in
            // flight (ETOOMANYREFS counts them against this process's
            // open-files limit): lb has no room for this client now, so
            // it is reset and counted like any other such client.
            maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
            let [c, s] = socks;
            drop(super::Socks::new(c, s)); // resets both
            if let Some(mut guard) = guard {
                guard.no_local_resources();
            }
            if let Some(n) = failures.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                log::warn!("cannot take {n} connection(s): handing them to the holder failed: {e}; reset");
            }
        }
    }
}

/// One connection on its way to the packet plane (see [`super::join`]).
pub(super) struct JoinJob {
    pub packet: Arc<Packet>,
    pub maps: Arc<Mutex<ConnMaps>>,
    pub link: Arc<Link>,
    pub stats: Arc<Counters>,
    pub header: u64,
    pub slot: u16,
}

impl JoinJob {
    /// Joins the connection and hands it to the holder as a joined one, or
    /// as a spliced one if it stays on the sockmap plane.
    pub async fn run(self, mut held: Held, mut guard: ConnGuard, socks: [std::net::TcpStream; 2]) {
        use std::sync::atomic::Ordering::Relaxed;
        let local = match socks[0].local_addr() {
            Ok(a) => a,
            Err(_) => return self.keep(held, guard, socks, super::join::Kept::Closed),
        };
        let ends = super::join::Ends { client: held.client, local, source: held.source, server: held.server };
        let j = super::join::Joining {
            socks: &socks,
            ends,
            header: self.header,
            id: held.id,
            cookies: held.cookies,
            slot: self.slot,
            start_ns: held.start_ns,
            route: [held.frontend, held.backend],
        };
        match super::join::join(&self.packet.flows, &self.packet.grace, &j).await {
            Ok(super::join::Joined::Carried) => {
                // Both sockets are in repair mode: closed without a sound.
                // No socket holds the source port then: lb keeps it booked.
                guard.joined(held.source.port(), move || drop(socks));
                // The verdict counted the bytes before the join; the
                // program's figures for the rest come with the end.
                guard.kernel_counted([false, false]);
                self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget_records(held.cookies);
                self.stats.packet_joined.fetch_add(1, Relaxed);
                held.packet = Some(local);
                if let Err((Some(guard), e)) = self.link.hold_joined(held, guard) {
                    // The connection carries on in the kernel, uncounted.
                    log::warn!("telling the holder of a joined connection: {e}");
                    guard.hand_over();
                }
            }
            Err(why) => self.keep(held, guard, socks, why),
        }
    }

    /// The connection stays on the sockmap plane.
    fn keep(self, held: Held, guard: ConnGuard, socks: [std::net::TcpStream; 2], why: super::join::Kept) {
        use super::join::Kept;
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        match why {
            Kept::Timestamps => &s.packet_kept_timestamps,
            Kept::Mss => &s.packet_kept_mss,
            Kept::Closed => &s.packet_kept_closed,
            Kept::Busy => &s.packet_kept_busy,
            Kept::Map => &s.packet_kept_map,
            Kept::Path => &s.packet_kept_path,
        }
        .fetch_add(1, Relaxed);
        log::debug!("connection {} stays on the sockmap plane: {why:?}", held.id);
        let cookies = held.cookies;
        let failures = Mutex::new(crate::observe::Every::new());
        hold(&self.link, &self.maps, &failures, held, guard, socks, cookies);
    }
}
