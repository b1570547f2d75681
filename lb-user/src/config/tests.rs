use super::*;

#[test]
fn example_is_valid() {
    let c = Config::parse("basic.toml", EXAMPLE).unwrap();
    assert_eq!(c.frontends[0].name, "web");
    assert_eq!(c.backends[0].servers.len(), 2);
}

#[test]
fn defaults_keep_long_lived_connections() {
    let c = Config::parse("basic.toml", EXAMPLE).unwrap();
    // A client with a 4-minute heartbeat must never be closed as idle.
    assert!(c.timeouts.idle > Duration::from_secs(4 * 60), "default idle {:?}", c.timeouts.idle);
    assert_eq!(c.workers, 1);
    assert!(c.maxconn >= 1);
    assert!(c.backends[0].pool.addrs.is_empty() && c.backends[0].pool.port_range.is_none());
}

#[test]
fn errors_name_line_and_key() {
    let e = Config::parse(
        "x.toml",
        "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackend = \"nope\"\n\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\n",
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "x.toml:4: frontend \"web\": backend: no [[backend]] named \"nope\"");
}

/// A host with 2 CPUs and this open-files hard limit, where every address
/// is local.
struct Limited(u64);
/// `LimitNOFILE=1048576` (dist/lb.service).
const SERVICE: Limited = Limited(1 << 20);
impl host::Host for Limited {
    fn is_local(&self, _: IpAddr) -> std::io::Result<bool> {
        Ok(true)
    }
    fn has_local_port_range(&self) -> bool {
        true
    }
    fn nofile_hard_limit(&self) -> u64 {
        self.0
    }
    fn has_interface(&self, _: &str) -> bool {
        true
    }
    fn possible_cpus(&self) -> u32 {
        2
    }
}

/// 16 workers under `LimitNOFILE=1048576` and no `maxconn`: the
/// open-files rule alone allowed 8,388,608 connections, whose maps
/// would take gigabytes of kernel memory. The default is what fits
/// `kernel_memory`.
#[test]
fn default_maxconn_fits_the_kernel_memory() {
    let text = |extra: &str| format!("workers = 16\n{extra}\n{}", EXAMPLE.replace("dataplane = \"auto\"", ""));
    let parse = |extra: &str| Config::parse_on(&SERVICE, "f.toml", &text(extra), &Overrides::default()).unwrap();
    let shape = |c: &Config| memory::Shape {
        maxconn: c.maxconn,
        workers: c.workers,
        frontends: c.frontends.len() as u32,
        servers: 2,
        pairs: 2,
        largest_pool: 1,
        kernel: true,
        guard: false,
        packet: false,
        cpus: 2,
    };
    let c = parse("");
    assert_eq!(c.kernel_memory, 256 << 20);
    assert_eq!(c.splice_queue_limit, 64 << 20, "on by default: a quarter of kernel_memory");
    assert!(c.maxconn < 100_000, "maxconn {} from the open-files rule alone", c.maxconn);
    assert!(shape(&c).bytes() <= c.kernel_memory, "{} bytes of maps", shape(&c).bytes());
    let one_more = memory::Shape { maxconn: c.maxconn + 1, ..shape(&c) };
    assert!(one_more.bytes() > c.kernel_memory, "maxconn {} is not the largest that fits", c.maxconn);
    assert_eq!(c.memory.capacities(), shape(&c).capacities());
    let big = parse("kernel_memory = \"4GiB\"");
    assert!(big.maxconn > 15 * c.maxconn, "4GiB: {} connections, 256MiB: {}", big.maxconn, c.maxconn);
    assert_eq!(big.splice_queue_limit, 1 << 30);
    assert_eq!(parse("kernel_memory = \"128MiB\"").splice_queue_limit, 32 << 20);
    assert_eq!(parse("splice_queue_limit = \"0\"").splice_queue_limit, 0, "still off when asked");
    // The userspace plane has no connection maps: only descriptors bound it.
    let u = parse("dataplane = \"userspace\"");
    assert_eq!(u.maxconn, 16 * ((1 << 20) - FD_RESERVE as u32) / 2);
    assert_eq!(u.memory.capacities().conn, 1);
}

/// Parsing asks the machine only through `Host`: a fake host decides.
/// A joined connection holds no descriptor: with every frontend on the
/// packet plane, `maxconn` is bounded by `kernel_memory`, not by two
/// descriptors per connection. One frontend on sockmap brings the rule back.
#[test]
fn maxconn_of_packet_frontends_is_not_bounded_by_descriptors() {
    let text = |splice: &str, extra: &str| {
        format!(
            "maxconn = 1000000\nkernel_memory = \"8GiB\"\n{splice}\n\
             [[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nbackend = \"b\"\n{extra}\n\
             [[frontend]]\nname = \"c\"\nlisten = \"127.0.0.1:7001\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9001\"]\n"
        )
    };
    let parse = |t: String| Config::parse_on(&Limited(20_000), "f.toml", &t, &Overrides::default());
    let c = parse(text("splice = \"packet\"", "")).unwrap();
    assert_eq!(c.maxconn, 1_000_000);
    let e = parse(text("splice = \"packet\"", "splice = \"sockmap\"")).unwrap_err().to_string();
    assert!(
        e.starts_with("f.toml:1: maxconn = 1000000: 1000000 connections per worker need 2000064 open files"),
        "{e}"
    );
    let e = parse(text("", "")).unwrap_err().to_string();
    assert!(e.contains("hard limit (ulimit -Hn) is 20000"), "{e}");
    let e = parse(text("splice = \"packet\"\ndataplane = \"userspace\"", "")).unwrap_err().to_string();
    assert!(e.contains("open files"), "the userspace plane joins nothing: {e}");
}

#[test]
fn host_facts_come_from_the_host() {
    struct Fake;
    impl host::Host for Fake {
        fn is_local(&self, ip: IpAddr) -> std::io::Result<bool> {
            Ok(ip.to_string() == "192.0.2.1")
        }
        fn has_local_port_range(&self) -> bool {
            false
        }
        fn nofile_hard_limit(&self) -> u64 {
            1000
        }
        fn has_interface(&self, _: &str) -> bool {
            false
        }
    }
    let text = |extra: &str| {
        format!(
            "{extra}\n[[frontend]]\nname = \"w\"\nlisten = \"192.0.2.1:0\"\nbackend = \"a\"\n[[backend]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\n"
        )
    };
    let o = Overrides::default();
    let c = Config::parse_on(&Fake, "f.toml", &text("source_pool = [\"192.0.2.1\"]"), &o).unwrap();
    assert_eq!(c.maxconn, 468, "(1000 - 64) / 2 fit");
    let e = Config::parse_on(&Fake, "f.toml", &text("source_pool = [\"127.0.0.1\"]"), &o).unwrap_err();
    assert!(e.to_string().contains("is not an address of this host"), "{e}");
    let e = Config::parse_on(&Fake, "f.toml", &text("").replace("192.0.2.1:0", "127.0.0.1:0"), &o).unwrap_err();
    assert!(e.to_string().contains("listen: 127.0.0.1 is not an address of this host"), "{e}");
    let e = Config::parse_on(&Fake, "f.toml", &text("source_port_range = \"1-2\""), &o).unwrap_err();
    assert!(e.to_string().contains("no IP_LOCAL_PORT_RANGE"), "{e}");
}
