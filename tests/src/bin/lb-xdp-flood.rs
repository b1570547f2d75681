//! `lb-xdp-flood`: runs a pinned XDP program on copies of one TCP SYN with
//! `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`):
//! the kernel builds real frames as if they arrived on INTERFACE and acts
//! on each verdict (`XDP_DROP` frees the frame, `XDP_PASS` hands it to the
//! network stack, as a driver would). The packet generator is the kernel
//! itself, on this core, so the rate is the program's and the stack's, not
//! a userspace tool's. Prints `{"packets", "secs", "pps"}`.

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
}

/// A SYN in an Ethernet frame addressed to `mac` (the interface's own, so
/// that the stack takes it for this host).
fn syn(mac: [u8; 6], src: IpAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst.ip()) else { panic!("IPv4 only") };
    let mut p = mac.to_vec();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    let sum = !ip.chunks(2).fold(0u32, |a, c| {
        let a = a + u32::from(u16::from_be_bytes([c[0], c[1]]));
        (a & 0xffff) + (a >> 16)
    }) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // TCP checksum over the pseudo-header.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = !pseudo.chunks(2).fold(0u32, |a, c| {
        let a = a + u32::from(u16::from_be_bytes([c[0], c[1]]));
        (a & 0xffff) + (a >> 16)
    }) as u16;
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    p.extend(tcp);
    p
}

fn main() -> anyhow::Result<()> {
    let a: Args = clap::Parser::parse();
    let prog = Xdp::from_pin(&a.prog, aya_obj::programs::XdpAttachType::Interface)?;
    let (ifindex, mac) = interface(&a.interface)?;
    let frame = syn(mac, a.src, a.dst);
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = a.packets;
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
