//! Outbound TCP for the upstream and for callbacks, under awc's pool and
//! TLS: our own connector, for two things awc cannot do.
//!
//! - **Where a callback may connect** (SPEC §9). Callback URLs are client
//!   input. The connector resolves the host itself, drops every address an
//!   `AddressPolicy` refuses, and connects only to the addresses it
//!   checked, so a DNS answer that changes between check and connect
//!   (rebinding) cannot bypass the check.
//! - **What an attempt did on the wire** (SPEC §5). Every connection is
//!   `Watched` and reports to the `AttemptWatch` of the task polling it:
//!   - whether request bytes may have been written: any write on a plain
//!     connection, any after the first (the ClientHello) on a TLS one; an
//!     attempt that timed out before that sent nothing;
//!   - whether a read found end of file while the answer's body was read:
//!     awc 3 ends a body quietly when the connection closes early, so a
//!     chunked answer cut between chunks looks complete, and `upstream`
//!     knows that a body framed by length or chunking never needs end of
//!     file to end.
//! - **Bodies that end with the connection** (SPEC §3): on a plain
//!   connection an answer's head is held until whole, and an HTTP/1.1 one
//!   whose body runs to the connection's end is handed to awc as HTTP/1.0,
//!   the version for which awc reads such a body (`head`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use actix_rt::net::TcpStream;
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use actix_web::http::Uri;
use futures_util::future::LocalBoxFuture;
use ipnet::IpNet;

mod head;
mod watch;
pub use watch::{AttemptWatch, Watched};

/// Link-local (where cloud metadata services live) and "this network".
pub const DEFAULT_CALLBACK_DENY: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "0.0.0.0/8"];

/// Which addresses a connection may go to: allow wins over deny, and
/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// The callback policy: the default deny list, plus `extra_deny`,
    /// opened up by `allow`.
    pub fn callbacks(extra_deny: &[IpNet], allow: &[IpNet]) -> AddressPolicy {
        let mut deny: Vec<IpNet> = DEFAULT_CALLBACK_DENY
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        deny.extend(extra_deny.iter().map(canonical_net));
        AddressPolicy {
            deny,
            allow: allow.iter().map(canonical_net).collect(),
        }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.iter().any(|n| n.contains(&ip)) || !self.deny.iter().any(|n| n.contains(&ip))
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d`: a socket connected to it reaches the
/// IPv4 host.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A range written as IPv4-mapped IPv6 (`::ffff:169.254.0.0/112`) is the
/// IPv4 range it maps.
fn canonical_net(net: &IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
                .map(|n| n.trunc())
                .unwrap_or(*net),
            None => *net,
        },
        other => *other,
    }
}

/// The error a refused address gives: `io::ErrorKind::PermissionDenied`,
/// which `is_refused_address` finds again under awc's wrapping.
fn refused(host: &str) -> ConnectError {
    ConnectError::Io(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{host}: every address it resolves to is denied (--callback-deny)"),
    ))
}

/// Whether awc's error is this connector refusing the address.
pub fn is_refused_address(e: &awc::error::SendRequestError) -> bool {
    matches!(
        e,
        awc::error::SendRequestError::Connect(awc::error::ConnectError::Io(io))
            if io.kind() == io::ErrorKind::PermissionDenied
    )
}

/// An awc client with the contract's settings over our connector, the
/// pool keeping idle connections `keep_alive` at most. `!Send`: one per
/// thread. awc's defaults would break the contract, so each is set: no
/// redirects, no default headers (`Date`, `User-Agent`), no timeout of its
/// own (callers bound the whole exchange), HTTP/1.1 only.
pub fn client(
    tls: std::sync::Arc<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
    keep_alive: std::time::Duration,
    policy: Option<AddressPolicy>,
) -> awc::Client {
    let connector = awc::Connector::new()
        .connector(Connector::new(policy))
        .rustls_0_23(tls)
        .timeout(connect_timeout)
        .handshake_timeout(connect_timeout)
        .conn_keep_alive(keep_alive)
        // No cap of awc's own (100 by default): the scheduler bounds what is
        // in flight, and a request waiting here for a connection slot would
        // run into its upstream timeout with nothing sent.
        .limit(0);
    awc::Client::builder()
        .connector(connector)
        .disable_redirects()
        .no_default_headers()
        .disable_timeout()
        .finish()
}

/// The TCP connector awc runs under its pool and TLS layer.
#[derive(Clone, Default)]
pub struct Connector {
    policy: Option<Rc<AddressPolicy>>,
}

impl Connector {
    pub fn new(policy: Option<AddressPolicy>) -> Connector {
        Connector {
            policy: policy.map(Rc::new),
        }
    }
}

impl Service<ConnectInfo<Uri>> for Connector {
    type Response = Connection<Uri, Watched>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let uri = req.request().clone();
            // A port that does not parse would silently become the
            // scheme's default: refuse it instead.
            if uri.port().is_some() && uri.port_u16().is_none() {
                return Err(ConnectError::InvalidInput);
            }
            let host = req.hostname().trim_start_matches('[').trim_end_matches(']');
            let port = req.port();
            let mut addrs: Vec<SocketAddr> = req.addrs().collect();
            if addrs.is_empty() {
                addrs = match host.parse::<IpAddr>() {
                    Ok(ip) => vec![SocketAddr::new(ip, port)],
                    Err(_) => tokio::net::lookup_host((host, port))
                        .await
                        .map_err(|e| ConnectError::Resolver(Box::new(e)))?
                        .collect(),
                };
            }
            if addrs.is_empty() {
                return Err(ConnectError::NoRecords);
            }
            if let Some(policy) = &policy {
                addrs.retain(|a| policy.permits(a.ip()));
                if addrs.is_empty() {
                    return Err(refused(host));
                }
            }
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(io) => {
                        let _ = io.set_nodelay(true);
                        let tls = uri.scheme_str() == Some("https");
                        return Ok(Connection::new(uri, Watched::new(io, tls)));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(ConnectError::Io(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "no address to connect to")
            })))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_callback_policy_denies_link_local_and_this_network_only() {
        let p = AddressPolicy::callbacks(&[], &[]);
        for denied in [
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::ffff:169.254.169.254",
        ] {
            assert!(!p.permits(ip(denied)), "{denied}");
        }
        for allowed in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.0.1",
            "93.184.216.34",
        ] {
            assert!(p.permits(ip(allowed)), "{allowed}");
        }
    }

    #[test]
    fn extra_deny_adds_and_allow_wins() {
        let deny: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let allow: Vec<IpNet> = vec![
            "127.0.0.7/32".parse().unwrap(),
            "169.254.1.0/24".parse().unwrap(),
        ];
        let p = AddressPolicy::callbacks(&deny, &allow);
        assert!(!p.permits(ip("127.0.0.1")));
        assert!(!p.permits(ip("::ffff:127.0.0.1")), "IPv4-mapped is IPv4");
        assert!(p.permits(ip("127.0.0.7")));
        assert!(p.permits(ip("::ffff:127.0.0.7")));
        assert!(p.permits(ip("169.254.1.9")), "allow opens a default range");
        assert!(!p.permits(ip("169.254.2.9")));
    }

    #[test]
    fn ranges_written_as_mapped_ipv6_are_ipv4_ranges() {
        let deny: Vec<IpNet> = vec!["::ffff:10.0.0.0/104".parse().unwrap()];
        let p = AddressPolicy::callbacks(&deny, &[]);
        assert!(!p.permits(ip("10.9.9.9")));
        assert!(p.permits(ip("11.0.0.1")));
    }
}
