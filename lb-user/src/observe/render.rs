//! The human forms of `lb stats` and `lb conns`: aligned tables whose
//! columns grow with their content.

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};

use super::{conns::ConnRow, counters::WorkerCounters, read::Report};

fn table(header: &[&str], right_from: usize) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header.to_vec());
    for i in right_from..header.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// `lb stats`: the totals, then one table of servers and one of sources.
pub fn stats(r: &Report) -> String {
    let mut o = format!("data plane {}   workers {}\n", r.dataplane, r.workers.len());
    let fields: Vec<String> = WorkerCounters::FIELDS
        .iter()
        .zip(r.totals.values())
        .map(|(f, v)| format!("{} {v}", f.name.replace('_', " ")))
        .collect();
    for line in fields.chunks(5) {
        o.push_str(&line.join("   "));
        o.push('\n');
    }
    if let Some(p) = &r.packet {
        o.push_str(&format!(
            "packet plane: flows {}   rewritten {}   bytes {}   sack blocks {}   deferred {}   ended {}   ends lost {}   \
             syn reuse {}   resets turned {}   sent out {}   icmp translated {}\n",
            p.flows,
            p.rewritten,
            p.bytes,
            p.sack_blocks,
            p.deferred,
            p.ended,
            p.ends_lost,
            p.syn_reuse,
            p.turned,
            p.redirected,
            p.icmp
        ));
    }
    if let Some(g) = &r.guard {
        o.push_str(&format!(
            "guard: passed {}   denied {}   rate limited {}   unparsed {}   fragments {}   deny rules {}   allow rules {}\n",
            g.passed,
            g.denied,
            g.rate_limited,
            g.unparsed,
            g.fragments,
            g.deny.len(),
            g.allow.len()
        ));
    }
    let mut servers =
        table(&["BACKEND", "SERVER", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "BYTES_IN", "BYTES_OUT", "FAILS"], 3);
    for s in &r.servers {
        servers.add_row(vec![
            s.backend.clone(),
            s.addr.to_string(),
            s.state.clone(),
            s.weight.to_string(),
            s.active.to_string(),
            s.total.to_string(),
            s.bytes_in.to_string(),
            s.bytes_out.to_string(),
            s.connect_failures.to_string(),
        ]);
    }
    let mut sources = table(&["SOURCE", "SERVER", "PORTS_IN_USE", "CONNECTS", "EXHAUSTED"], 2);
    for s in &r.sources {
        sources.add_row(vec![
            s.ip.clone(),
            s.server.to_string(),
            s.ports_in_use.to_string(),
            s.connects.to_string(),
            s.exhausted.to_string(),
        ]);
    }
    o.push_str(&format!("\n{servers}\n\n{sources}\n"));
    if !r.maps.is_empty() {
        let fill: Vec<String> = r
            .maps
            .iter()
            .map(|m| match m.entries {
                Some(n) => format!("{} {n}/{} ({}%)", m.map, m.capacity, n * 100 / u64::from(m.capacity.max(1))),
                None => format!("{} ?/{}", m.map, m.capacity),
            })
            .collect();
        o.push_str(&format!("\nmaps (entries/capacity): {}\n", fill.join("   ")));
    }
    if r.dataplane == "kernel" {
        let c = &r.counters;
        o.push_str(&format!(
            "\nkernel: {} bytes in {} skbs redirected, {} spliced sockets, {} peer misses, {} flow events ({} lost); \
             {} connections set up by sock_ops ({} failed)\n",
            c.bytes_redirected,
            c.skbs_redirected,
            c.spliced_sockets,
            c.peer_missing,
            c.flow_events,
            c.flow_events_lost,
            c.kernel_setups,
            c.kernel_setup_failures
        ));
    }
    if let Some(p) = &r.programs {
        let id = |i: Option<u32>| i.map_or_else(|| "none".to_owned(), |i| format!("id {i}"));
        let hash = if p.ebpf_sha256.is_empty() { "unknown" } else { &p.ebpf_sha256 };
        o.push_str(&format!(
            "programs: eBPF object sha256 {hash}; verdict {}, sock_ops {}\n",
            id(p.running.verdict_id),
            id(p.running.setup_id)
        ));
    }
    o
}

/// `lb conns`.
pub fn conns(rows: &[ConnRow]) -> String {
    let mut t =
        table(&["CLIENT", "SERVER", "SOURCE", "WORKER", "PLANE", "AGE_S", "IDLE_S", "BYTES_IN", "BYTES_OUT"], 3);
    for r in rows {
        t.add_row(vec![
            r.client.to_string(),
            r.server.to_string(),
            r.source.to_string(),
            r.worker.to_string(),
            r.plane.to_string(),
            format!("{:.1}", r.age_secs),
            format!("{:.1}", r.idle_secs),
            r.bytes_in.to_string(),
            r.bytes_out.to_string(),
        ]);
    }
    format!("{t}\n{} connection(s)\n", rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::read::ServerRow;

    #[test]
    fn server_table_stays_aligned_for_every_state_and_long_names() {
        let row = |state: &str, backend: &str| ServerRow {
            backend: backend.into(),
            addr: "127.0.0.1:9001".parse().unwrap(),
            state: state.into(),
            weight: 1,
            active: 2,
            total: 3,
            bytes_in: 4,
            bytes_out: 5,
            connect_failures: 0,
        };
        let long = "b".repeat(64);
        let mut servers: Vec<ServerRow> = ["up", "down", "drain", "maint", "removed"].map(|s| row(s, "app")).to_vec();
        servers.push(row("up", &long));
        let r = Report { dataplane: "userspace".into(), servers, ..Default::default() };
        let text = stats(&r);
        let table: Vec<&str> = text.lines().skip_while(|l| !l.contains("BACKEND")).take(7).collect();
        assert_eq!(table.len(), 7, "{text}");
        // WEIGHT is right-aligned: every line ends that column at the same place.
        let end = table[0].find("WEIGHT").unwrap() + "WEIGHT".len();
        for l in &table[1..] {
            assert_eq!(&l[end - 1..end], "1", "misaligned row:\n{text}");
        }
        assert!(text.contains(&long), "a 64-character name is shown whole:\n{text}");
    }
}
