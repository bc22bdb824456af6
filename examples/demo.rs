//! Three channels on 127.0.0.1: each sends a greeting to the others in every send mode, and
//! each prints what it received.
//!
//! ```text
//! cargo run --example demo                          # static membership
//! cargo run --example demo -- --membership multicast   # beacons on 127.0.0.1, TTL 0
//! cargo run --example demo -- --membership dns         # a name served by a DNS responder
//! ```                                                   # on 127.0.0.1, nodes on 127.0.0.1-3

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, Ipv4Addr};

use tribes::membership::{
    dns_member_id, DnsConfig, DnsMembershipInterceptor, McastConfig, Resolver,
};
use tribes::{ChannelMessage, GroupChannel, Levels, SendOptions};
use tribes_suite::{static_group, wait_until, DnsResponder, GroupOptions};

/// Three channels that find each other by multicast beacons on 127.0.0.1 (TTL 0: the
/// beacons never leave the machine).
fn multicast_group(n: usize) -> Result<Vec<GroupChannel>, Box<dyn std::error::Error>> {
    let cfg = McastConfig {
        port: 45564,
        frequency: Duration::from_millis(100),
        drop_time: Duration::from_millis(1000),
        ttl: Some(0),
        ..McastConfig::default()
    };
    let mut nodes = Vec::new();
    for i in 0..n {
        let ch = GroupChannel::builder()
            .name(format!("node{i}"))
            .port(0)
            .multicast(cfg.clone())
            .build()?;
        ch.start(Levels::ALL)?;
        nodes.push(ch);
    }
    for ch in &nodes {
        if !ch.wait_for_members(n - 1, Duration::from_secs(5)) {
            return Err("members did not find each other by multicast".into());
        }
    }
    Ok(nodes)
}

/// Three channels on 127.0.0.1, .2 and .3 (one port) that find each other by resolving one
/// name at a DNS responder this demo runs on 127.0.0.1, as pods behind a headless service do.
fn dns_group(n: u8) -> Result<(Vec<GroupChannel>, DnsResponder), Box<dyn std::error::Error>> {
    let ips: Vec<Ipv4Addr> = (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let dns = DnsResponder::start(ips.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut nodes = Vec::new();
    for ip in &ips {
        let ch = GroupChannel::builder()
            .name(format!("node{}", ip.octets()[3]))
            .address(IpAddr::V4(*ip))
            .port(port)
            .unique_id(dns_member_id(IpAddr::V4(*ip)))
            .interceptor(DnsMembershipInterceptor::new(DnsConfig {
                name: "tribes-demo.local".into(),
                expiration: Duration::from_secs(5),
                resolver: Resolver::Server(dns.addr),
            }))
            .build()?;
        ch.start(Levels::ALL)?;
        nodes.push(ch);
    }
    // Each node resolved the name when it started; poll once more so early starters see the
    // later ones (the heartbeat thread would do it within 5 s).
    for ch in &nodes {
        ch.heartbeat();
        if !ch.wait_for_members(ips.len() - 1, Duration::from_secs(5)) {
            return Err("members did not find each other through DNS".into());
        }
    }
    Ok((nodes, dns))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let membership = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "static".to_string(),
        [flag, value] if flag == "--membership" => value.clone(),
        _ => return Err("usage: demo [--membership static|multicast|dns]".into()),
    };
    // The DNS responder (dns mode only) lives as long as the nodes poll it.
    let mut _dns = None;
    let nodes = match membership.as_str() {
        "static" => static_group(3, &GroupOptions::default())?,
        "multicast" => multicast_group(3)?,
        "dns" => {
            let (nodes, dns) = dns_group(3)?;
            _dns = Some(dns);
            nodes
        }
        other => {
            return Err(format!("unknown membership {other} (static, multicast or dns)").into())
        }
    };
    let received = Arc::new(AtomicUsize::new(0));
    for node in &nodes {
        let me = node.local_member();
        let received = Arc::clone(&received);
        node.add_channel_listener(move |m: &ChannelMessage| {
            println!(
                "{me} received {:?} from {} (options: {})",
                String::from_utf8_lossy(&m.payload),
                m.sender,
                m.options
            );
            received.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
    }
    for node in &nodes {
        println!(
            "{} sees {} member(s): {}",
            node.local_member(),
            node.members().len(),
            node.members()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let modes = [
        ("async", SendOptions::ASYNCHRONOUS),
        ("no-ack", SendOptions::empty()),
        ("ack", SendOptions::USE_ACK),
        (
            "sync-ack",
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        ),
    ];
    for node in &nodes {
        let others = node.members();
        for (name, opts) in modes {
            let text = format!("hello ({name}) from {}", node.local_member());
            node.send(&others, text.into_bytes(), opts)?;
        }
    }
    let expected = nodes.len() * (nodes.len() - 1) * modes.len();
    let all = wait_until(Duration::from_secs(10), || {
        received.load(Ordering::SeqCst) >= expected
    });
    for node in &nodes {
        node.stop(Levels::ALL)?;
    }
    println!(
        "{} of {expected} messages received{}",
        received.load(Ordering::SeqCst),
        if all { "" } else { " (some missing!)" }
    );
    if all {
        Ok(())
    } else {
        Err("not every message arrived".into())
    }
}
