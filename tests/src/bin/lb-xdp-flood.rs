//! `lb-xdp-flood`: runs a pinned XDP program on copies of one TCP SYN with
//! `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`):
//! the kernel builds real frames as if they arrived on INTERFACE and acts
//! on each verdict (`XDP_DROP` frees the frame, `XDP_PASS` hands it to the
//! network stack, as a driver would). The packet generator is the kernel
//! itself, on this core, so the rate is the program's and the stack's, not
//! a userspace tool's. Prints `{"packets", "secs", "pps"}`.
//!
//! With `--plain` the run is an ordinary test run (no live frames: the
//! verdicts are returned, not acted on), for hosts that refuse live frames
//! (lockdown): prints `{"packets", "verdict", "ns_per_frame"}`, the
//! program's own time per frame as the kernel measured it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};

#[derive(clap::Parser)]
#[command(name = "lb-xdp-flood", about = "Flood a pinned XDP program with one TCP SYN, in the kernel")]
struct Args {
    /// The pinned XDP program (`<pin_path>/lb_guard`).
    #[arg(long)]
    prog: std::path::PathBuf,
    /// The interface the frames arrive on.
    #[arg(long)]
    interface: String,
    #[arg(long)]
    src: IpAddr,
    #[arg(long)]
    dst: SocketAddr,
    #[arg(long, default_value_t = 5_000_000)]
    packets: u32,
    /// An ordinary test run instead of live frames.
    #[arg(long)]
    plain: bool,
}

fn main() -> anyhow::Result<()> {
    let a: Args = clap::Parser::parse();
    let prog = Xdp::from_pin(&a.prog, aya_obj::programs::XdpAttachType::Interface)?;
    let (ifindex, mac) = interface(&a.interface)?;
    // Addressed to the interface's own MAC, so that the stack takes it for this host.
    let frame = testkit::packet::tcp(mac, a.src, a.dst, 0x02);
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = a.packets;
    if a.plain {
        let r = prog.test_run(opts)?;
        let ns = r.duration.as_secs_f64() * 1e9;
        println!("{}", serde_json::json!({ "packets": a.packets, "verdict": r.return_value, "ns_per_frame": ns }));
        return Ok(());
    }
    opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
    let t0 = Instant::now();
    prog.test_run(opts)?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({ "packets": a.packets, "secs": secs, "pps": f64::from(a.packets) / secs }));
    Ok(())
}

/// The index and MAC address of `name` in this network namespace (from
/// `ip`: /sys/class/net may show another namespace's).
fn interface(name: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let out = std::process::Command::new("ip").args(["-o", "link", "show", name]).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let index = s.split(':').next().and_then(|i| i.trim().parse().ok());
    let mac = s.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).and_then(|m| {
        let b: Vec<u8> = m.split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).collect();
        <[u8; 6]>::try_from(b).ok()
    });
    match (index, mac) {
        (Some(i), Some(m)) => Ok((i, m)),
        _ => anyhow::bail!("no Ethernet interface {name}: {s}"),
    }
}
