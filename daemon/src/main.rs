//! `machnetd`: see `machnetd --help` and docs/operations.md.

use clap::Parser;
use machnet::ctrl::CtrlServer;
use machnet::layout::ChannelConfig;
use machnet_daemon::arp::ArpConfig;
use machnet_daemon::config;
use machnet_daemon::config::{Backend, Config, DEFAULT_CTRL_SOCK};
use machnet_daemon::controller::{Access, Controller, DaemonInfo, ShardLink, ShardView};
use machnet_daemon::mesh::Mesh;
use machnet_daemon::metrics::MetricsServer;
use machnet_daemon::ports::SharedPorts;
use machnet_daemon::shard::{EngineShard, Reporting, ShardSetup};
use machnet_net::port::fault::{FaultConfig, Faulty};
use machnet_net::port::udp::{UdpConfig, UdpPeer, UdpPort};
use machnet_net::port::Port;
use machnet_runtime::idle::{IdlePolicy, Parker};
use machnet_runtime::shard::{Shard, ShardConfig};
use machnet_transport::{Endpoint, LocalAddr};
use std::io::Read;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// machnetd: the machnet-rs sidecar daemon. It owns a network port, runs the Machnet transport
/// on one engine shard per queue, and serves applications on this host over shared-memory
/// channels (machnet.h / the Rust client). SIGINT or SIGTERM shut it down in order: flows are
/// reset, applications told, the control socket removed, exit status 0.
#[derive(Parser, Debug)]
#[command(name = "machnetd", version)]
struct Cli {
    /// Configuration file: Machnet's config.json schema ("machnet_config": {MAC: {ip,
    /// engine_threads, cpu_mask, pcie}}) plus the optional "machnet_rs" extension key
    /// (docs/operations.md). Also accepted as --config_json.
    #[arg(long, alias = "config_json", default_value = "/var/run/machnet/local_config.json")]
    config: PathBuf,

    /// Control socket path. Default: the config's machnet_rs.ctrl_sock, else
    /// $MACHNET_CTRL_SOCK, else /var/run/machnet/machnet_ctrl.sock.
    #[arg(long)]
    ctrl_sock: Option<PathBuf>,

    /// Log level.
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,

    /// Serve Prometheus metrics at http://ADDR/metrics: ip:port, or a port on 127.0.0.1 (0: any
    /// free port, logged). Default: the config's machnet_rs.metrics_addr, else off.
    #[arg(long, value_name = "ADDR", value_parser = config::parse_metrics_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Longest park of an adaptive shard whose port has no file descriptor to wake it, µs.
const DEFAULT_POLL_PARK_US: u64 = 50;

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b) ^ u64::from(std::process::id()).rotate_left(32)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new().parse_filters(&cli.log_level).format_target(false).init();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("machnetd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&cli, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("machnetd: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli, mut cfg: Config) -> Result<(), String> {
    if cli.metrics_addr.is_some() {
        cfg.metrics_addr = cli.metrics_addr;
    }
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, term.clone()).map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    let ctrl_path = cli
        .ctrl_sock
        .clone()
        .or_else(|| cfg.ext.ctrl_sock.as_ref().map(PathBuf::from))
        .or_else(|| std::env::var_os("MACHNET_CTRL_SOCK").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CTRL_SOCK));
    match cfg.ext.backend {
        Backend::Udp => {
            let bind = cfg.udp_bind.expect("validated");
            let peers = cfg.udp_peers.iter().map(|p| UdpPeer::with_queues(p.addr, p.queues, &p.rss_key)).collect();
            let queues = u16::try_from(cfg.engine_threads).expect("validated: at most 64");
            let ucfg = UdpConfig { rss_key: cfg.udp_rss_key.clone(), ..UdpConfig::new(bind, cfg.mac, peers) };
            let ports = UdpPort::open_queues(&ucfg, queues).map_err(|e| {
                let last = bind.port() + queues - 1;
                let at = if queues > 1 { format!("{bind} (to port {last})") } else { bind.to_string() };
                format!("udp backend: cannot bind {at}: {e}")
            })?;
            let peers: Vec<String> = cfg
                .udp_peers
                .iter()
                .map(|p| if p.queues > 1 { format!("{} ({} queues)", p.addr, p.queues) } else { p.addr.to_string() })
                .collect();
            let desc = if queues > 1 {
                format!("udp tunnel {bind}, {queues} queues on ports {}..={}, RSS (peers {peers:?})", bind.port(), bind.port() + queues - 1)
            } else {
                format!("udp tunnel {bind} (peers {peers:?})")
            };
            let ports = ports.into_iter().map(|p| {
                let fd = p.raw_fd();
                (p, Some(fd))
            });
            serve_ports(&cfg, ports.collect(), &desc, &ctrl_path, &term)
        }
        #[cfg(feature = "dpdk")]
        Backend::Dpdk => {
            let (backend, ports) = machnet_daemon::dpdk_backend::DpdkBackend::open(&cfg)?;
            let desc = backend.describe();
            let r = serve_ports(&cfg, ports.into_iter().map(|p| (p, None)).collect(), &desc, &ctrl_path, &term);
            backend.close();
            r
        }
        #[cfg(not(feature = "dpdk"))]
        Backend::Dpdk => Err("the dpdk backend is not built into this machnetd (build with --features dpdk; a configuration without machnet_rs.udp means the DPDK NIC, as the original's does)".into()),
    }
}

/// Serves `ports` (one per shard), wrapped by the fault injector if the configuration asks.
fn serve_ports<P>(
    cfg: &Config,
    ports: Vec<(P, Option<RawFd>)>,
    port_desc: &str,
    ctrl_path: &PathBuf,
    term: &AtomicBool,
) -> Result<(), String>
where
    P: Port + Send + 'static,
    P::Buf: Send,
{
    match &cfg.ext.fault {
        None => serve(cfg, ports, port_desc, ctrl_path, term),
        Some(f) => {
            let seed = f.seed.unwrap_or_else(random_seed);
            log::warn!(
                "fault injection on transmit: loss {}, duplicate {}, reorder {} (by {} us), corrupt {}, delay {} us + jitter {} us, seed {seed}",
                f.loss,
                f.duplicate,
                f.reorder,
                f.reorder_delay_us.unwrap_or(100),
                f.corrupt,
                f.delay_us,
                f.jitter_us
            );
            let faulty = ports
                .into_iter()
                .enumerate()
                .map(|(i, (p, fd))| {
                    let fc = FaultConfig {
                        seed: seed.wrapping_add(i as u64),
                        drop: f.loss,
                        duplicate: f.duplicate,
                        corrupt: f.corrupt,
                        reorder: f.reorder,
                        reorder_delay: Duration::from_micros(f.reorder_delay_us.unwrap_or(100)),
                        delay: Duration::from_micros(f.delay_us),
                        jitter: Duration::from_micros(f.jitter_us),
                        hold_capacity: 2048,
                        ..FaultConfig::default()
                    };
                    (Faulty::new(p, fc), fd)
                })
                .collect();
            serve(cfg, faulty, &format!("{port_desc}, with fault injection"), ctrl_path, term)
        }
    }
}

fn serve<P>(
    cfg: &Config,
    ports: Vec<(P, Option<RawFd>)>,
    port_desc: &str,
    ctrl_path: &PathBuf,
    term: &AtomicBool,
) -> Result<(), String>
where
    P: Port + Send + 'static,
    P::Buf: Send,
{
    let tcfg = cfg.transport();
    let shared_ports = SharedPorts::new();
    let mut idle = match cfg.ext.idle.as_deref() {
        Some("busy") => IdlePolicy::Busy,
        Some(_) => IdlePolicy::ADAPTIVE,
        None => IdlePolicy::default_for(ports.len()),
    };
    // A port without a file descriptor (DPDK) cannot wake a parked shard: parks are then
    // short sleeps between polls.
    let pollable = ports.iter().all(|(_, fd)| fd.is_some());
    if let IdlePolicy::Adaptive { spin, yield_for, max_park } = &mut idle {
        match cfg.ext.idle_max_park_us {
            Some(us) => *max_park = Duration::from_micros(us),
            None if !pollable => *max_park = Duration::from_micros(DEFAULT_POLL_PARK_US),
            None => {}
        }
        if let Some(us) = cfg.ext.idle_spin_us {
            *spin = Duration::from_micros(us);
        }
        if let Some(us) = cfg.ext.idle_yield_us {
            *yield_for = Duration::from_micros(us);
        }
    }
    let arp_cfg = ArpConfig {
        timeout: cfg.ext.arp.timeout_s.map_or(ArpConfig::default().timeout, Duration::from_secs),
        retries: cfg.ext.arp.retries.unwrap_or(ArpConfig::default().retries),
        retry: cfg.ext.arp.retry_ms.map_or(ArpConfig::default().retry, Duration::from_millis),
        ..ArpConfig::default()
    };
    let rx_caps = |p: &P| {
        let c = p.capabilities().checksum;
        if cfg.ext.no_rx_checksum {
            c.without_rx()
        } else {
            c
        }
    };
    let cpus = cfg.cpus();
    let mut shards = Vec::new();
    let mut links = Vec::new();
    let mut views = Vec::new();
    let parkers = (0..ports.len())
        .map(|_| Parker::new().map_err(|e| format!("cannot create a parker: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let wakers: Vec<_> = parkers.iter().map(|p| p.waker()).collect();
    let meshes = Mesh::build(&wakers);
    // Closed channels come back from the shards to be unmapped here (10-20 ms each).
    let (graveyard, dead_channels) = mpsc::sync_channel(256);
    for (i, (((port, fd), parker), mesh)) in ports.into_iter().zip(parkers).zip(meshes).enumerate() {
        let local = LocalAddr { mac: cfg.mac, ip: cfg.ip };
        let mut endpoint =
            Endpoint::new(machnet_transport::Config { seed: random_seed(), ..tcfg }, local, shared_ports.clone())
                .map_err(|e| format!("transport configuration: {e}"))?;
        endpoint.set_steering(port.capabilities().rss.as_ref().and_then(|r| r.build()), i as u16);
        let (tx, rx) = mpsc::sync_channel(1024);
        if let Some(fd) = fd {
            parker.add_fd(fd, u64::MAX - 1).map_err(|e| format!("cannot watch the port: {e}"))?;
        }
        let report = Reporting::shared();
        let setup = ShardSetup {
            index: i,
            rx_caps: rx_caps(&port),
            port,
            endpoint,
            arp: (arp_cfg, cfg.static_arp.clone()),
            cmds: rx,
            fds: parker.fd_set(),
            report: report.clone(),
            linger: Duration::from_millis(cfg.ext.channel.linger_ms.unwrap_or(2000)),
            linger_max: Duration::from_millis(cfg.ext.channel.linger_max_ms.unwrap_or(30_000)),
            gone_linger: Duration::from_millis(cfg.ext.channel.gone_linger_ms.unwrap_or(500)),
            mesh,
            graveyard: graveyard.clone(),
        };
        let scfg = ShardConfig {
            name: format!("machnet-shard{i}"),
            core: cpus.get(i).copied(),
            idle,
            ..ShardConfig::default()
        };
        let shard = Shard::spawn_with(scfg, EngineShard::new(setup), parker)
            .map_err(|e| format!("cannot start shard {i}: {e}"))?;
        links.push(ShardLink { cmds: tx, waker: shard.waker(), channels: 0 });
        views.push(ShardView { report: report.clone(), stats: shard.stats_handle(), core: cpus.get(i).copied() });
        shards.push((shard, report));
    }
    let channel_cfg = ChannelConfig {
        mss: tcfg.mss as u32,
        tx_bufs: cfg.ext.channel.buffers.unwrap_or(ChannelConfig::DEFAULT.tx_bufs),
        rx_bufs: cfg.ext.channel.buffers.unwrap_or(ChannelConfig::DEFAULT.rx_bufs),
        tx_ring: cfg.ext.channel.ring_entries.unwrap_or(ChannelConfig::DEFAULT.tx_ring),
        rx_ring: cfg.ext.channel.ring_entries.unwrap_or(ChannelConfig::DEFAULT.rx_ring),
        ..ChannelConfig::DEFAULT
    };
    let info = DaemonInfo {
        ip: cfg.ip,
        mac: cfg.mac.to_string(),
        backend: format!("{:?}", cfg.ext.backend).to_lowercase(),
        port: port_desc.to_string(),
        idle: format!("{idle:?}"),
        config: cfg.file.display().to_string(),
    };
    let access =
        Access { allow_uids: cfg.ext.access.allow_uids.clone(), allow_gids: cfg.ext.access.allow_gids.clone() };
    let mut controller = Controller::new(links, channel_cfg, cfg.max_channels())
        .with_channels_per_app(cfg.max_channels_per_app())
        .with_stats(info, views)
        .with_access(access);
    let metrics_addr = cfg.metrics_addr;
    let group = cfg.ext.access.socket_group.as_deref().and_then(config::group_id);
    let server = match CtrlServer::bind_with(ctrl_path, cfg.socket_mode(), group) {
        Ok(s) => s,
        Err(e) => {
            controller.shutdown();
            for (s, _) in shards {
                let _ = s.join();
            }
            return Err(format!("cannot open the control socket {}: {e}", ctrl_path.display()));
        }
    };
    log::info!(
        "machnetd ready: {} ({}), {:?} backend, {} shard(s), {idle:?}, control socket {}",
        cfg.ip,
        cfg.mac,
        cfg.ext.backend,
        shards.len(),
        ctrl_path.display()
    );
    let mut metrics = match metrics_addr {
        None => None,
        Some(addr) => match MetricsServer::bind(addr) {
            Ok(m) => {
                let at = m.local_addr().unwrap_or(addr);
                log::info!("metrics: serving http://{at}/metrics");
                if !at.ip().is_loopback() {
                    log::warn!("metrics on {at}, not a loopback address: whoever reaches it reads every flow and application, past the access list");
                }
                Some(m)
            }
            Err(e) => {
                controller.shutdown();
                for (s, _) in shards {
                    let _ = s.join();
                }
                return Err(format!("cannot serve metrics on {addr}: {e}"));
            }
        },
    };
    let mut server = server;
    while !term.load(Ordering::Relaxed) {
        // The metrics endpoint shares the controller's wait: its listener and connections wake it.
        let (also, wait) = match &metrics {
            Some(m) => (m.fds(), if m.writing() { 5 } else { 100 }),
            None => (Vec::new(), 100),
        };
        if let Err(e) = server.poll_also(Some(Duration::from_millis(wait)), &mut controller, &also) {
            log::error!("control socket: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(m) = metrics.as_mut() {
            m.poll(&controller);
        }
        while let Ok(slot) = dead_channels.try_recv() {
            drop(slot);
        }
    }
    log::info!("shutting down: resetting flows and telling {} application(s)", controller.app_count());
    controller.shutdown();
    for (s, report) in shards {
        let name = s.stats().name;
        let _ = s.join();
        let r = report.snapshot();
        log::info!(
            "{name}: {} flows opened, {} messages in / {} out, {} retransmissions, {} sends refused (not the sender's flow), {} channel violations, {} handed to other shards / {} from them / {} dropped",
            r.endpoint.flows_opened,
            r.endpoint.rx_messages,
            r.endpoint.tx_messages,
            r.endpoint.tx_retransmits,
            r.counters.tx_refused,
            r.counters.channel_violations,
            r.counters.handoff_sent,
            r.counters.handoff_received,
            r.counters.handoff_dropped,
        );
        if let Some(f) = r.faults {
            log::info!(
                "{name}: faults injected on transmit: {} of {} frames dropped, {} duplicated, {} reordered, {} corrupted; {} duplicate packets received",
                f.dropped,
                f.offered,
                f.duplicated,
                f.reordered,
                f.corrupted,
                r.endpoint.rx_duplicate
            );
        }
    }
    drop(server);
    log::info!("stopped");
    Ok(())
}
