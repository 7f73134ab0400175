//! Command-line flags. Every flag has an `ASYNCGATE_*` environment
//! variable and a default; the doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "asyncgate",
    version,
    about = "An asynchronous API gateway: accepts calls at once, runs them paced against the upstream's limits, keeps the responses."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in front of an upstream API.
    Serve(ServeArgs),
    /// Run the gateway together with a bundled demo upstream (for trying it).
    Demo(DemoArgs),
    /// Examine and settle `unknown` requests through a running gateway's
    /// admin API.
    Admin(AdminArgs),
    /// Print shell completions for this command (bash, zsh, fish, ...).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) made from the same definitions as `--help`.
    Man(ManArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// The page of a subcommand instead of the main one (`serve`, `admin list`).
    pub subcommand: Vec<String>,

    /// Write every page (asyncgate.1, asyncgate-serve.1, ...) into this
    /// directory instead of printing one.
    #[arg(long, conflicts_with = "subcommand")]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Base URL of the upstream API (scheme, host, optional port and path
    /// prefix); `/async_api/<rest>` runs as `BASE/api/<rest>`.
    #[arg(long, env = "ASYNCGATE_UPSTREAM")]
    pub upstream: String,

    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address of the demo upstream.
    #[arg(long, env = "ASYNCGATE_DEMO_LISTEN", default_value = "127.0.0.1:8081")]
    pub demo_listen: SocketAddr,

    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "ASYNCGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of a separate listener for /healthz, /metrics,
    /// /openapi.json and /admin/... (port 0 picks a free port); the public
    /// listener then answers them 404 [default: all on --listen].
    #[arg(long, env = "ASYNCGATE_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,

    /// Log lines as plain text or as one JSON object per line (`ts`,
    /// `level`, `target`, `msg`, and `id` when the line is about one
    /// request). `RUST_LOG` sets the level.
    #[arg(long, env = "ASYNCGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Directory of the durable store (the embedded one; with --store,
    /// the node's name and the default place of the credential key file).
    #[arg(long, env = "ASYNCGATE_DATA_DIR", default_value = "./asyncgate-data")]
    pub data_dir: PathBuf,

    /// Keep every piece of state in one PostgreSQL database instead of
    /// --data-dir: `postgres://user:password@host:port/database` [default:
    /// the embedded store in --data-dir].
    // The URL may hold a password: its value is never shown in --help.
    #[arg(long, env = "ASYNCGATE_STORE", value_parser = parse_store_url, hide_env_values = true)]
    pub store: Option<String>,

    /// With --store: a node silent (no heartbeat) this long is presumed
    /// dead, and the other nodes settle what it had started.
    #[arg(long, env = "ASYNCGATE_NODE_HEARTBEAT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub node_heartbeat_timeout: Duration,

    /// Key that seals stored credentials [default: <data-dir>.key]. Created
    /// with mode 0600 on first start; keep it out of the data dir's backups.
    #[arg(long, env = "ASYNCGATE_CREDENTIAL_KEY_FILE")]
    pub credential_key_file: Option<PathBuf>,

    /// How long `done` requests and their responses are kept.
    #[arg(long, env = "ASYNCGATE_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// How long `unknown` requests wait for an operator.
    #[arg(long, env = "ASYNCGATE_UNKNOWN_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub unknown_retention: Duration,

    /// Largest accepted request body (e.g. 10MiB, 512KiB, 1000).
    #[arg(long, env = "ASYNCGATE_MAX_BODY_SIZE", default_value = "10MiB", value_parser = parse_size)]
    pub max_body_size: u64,

    /// Largest upstream response body kept; larger ones answer 502.
    #[arg(long, env = "ASYNCGATE_MAX_RESPONSE_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_response_size: u64,

    /// Upstream requests in flight, in all.
    #[arg(long, env = "ASYNCGATE_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,

    /// Upstream requests in flight per credential.
    #[arg(
        long,
        env = "ASYNCGATE_PER_CREDENTIAL_CONCURRENCY",
        default_value_t = 4
    )]
    pub per_credential_concurrency: usize,

    /// Requests per second per credential [default: unlimited].
    #[arg(long, env = "ASYNCGATE_PER_CREDENTIAL_RPS")]
    pub per_credential_rps: Option<u32>,

    /// Whole upstream exchange, up to the last body byte.
    #[arg(long, env = "ASYNCGATE_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub upstream_timeout: Duration,

    /// Connecting (and the TLS handshake) to the upstream.
    #[arg(long, env = "ASYNCGATE_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub connect_timeout: Duration,

    /// How long an idle upstream connection is kept for reuse. Keep it
    /// below the upstream's own keep-alive timeout: a request written on a
    /// connection the upstream is closing at that moment may have run, and
    /// a non-idempotent one then ends `unknown`.
    #[arg(long, env = "ASYNCGATE_UPSTREAM_KEEP_ALIVE", default_value = "750ms", value_parser = parse_duration)]
    pub upstream_keep_alive: Duration,

    /// PEM file of extra CA certificates to trust for an https upstream.
    #[arg(long, env = "ASYNCGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// On SIGTERM/SIGINT, how long calls in flight may still finish.
    #[arg(long, env = "ASYNCGATE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Free space the data dir's file system keeps in reserve: below it,
    /// submissions get 507 (status, responses and execution go on).
    #[arg(long, env = "ASYNCGATE_MIN_FREE_DISK", default_value = "256MiB", value_parser = parse_size)]
    pub min_free_disk: u64,

    /// Most `enqueued` requests per credential; a submission past it gets
    /// 429 with `Retry-After: 1` [default: unlimited].
    #[arg(long, env = "ASYNCGATE_MAX_PENDING_PER_CREDENTIAL")]
    pub max_pending_per_credential: Option<u64>,

    /// Address ranges callbacks may not connect to, in addition to the
    /// default 169.254.0.0/16, fe80::/10 and 0.0.0.0/8 (comma-separated or
    /// repeated CIDRs).
    #[arg(long, env = "ASYNCGATE_CALLBACK_DENY", value_delimiter = ',')]
    pub callback_deny: Vec<ipnet::IpNet>,

    /// Address ranges callbacks may connect to even when denied (allow
    /// wins over deny; comma-separated or repeated CIDRs).
    #[arg(long, env = "ASYNCGATE_CALLBACK_ALLOW", value_delimiter = ',')]
    pub callback_allow: Vec<ipnet::IpNet>,

    /// Signs every callback (Standard Webhooks 1.0: `webhook-timestamp`,
    /// `webhook-signature`) with the `whsec_`-prefixed base64 secret in
    /// this file; made with mode 0600 when missing [default: unsigned].
    #[arg(long, env = "ASYNCGATE_CALLBACK_SECRET_FILE")]
    pub callback_secret_file: Option<PathBuf>,

    /// Public base URL (absolute http:// or https://, optional path
    /// prefix, no query); makes `response_url` and callbacks' `status_url`
    /// absolute.
    #[arg(long, env = "ASYNCGATE_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// The longest a `Prefer: wait=N` holds an answer (a bare number is
    /// seconds).
    #[arg(long, env = "ASYNCGATE_MAX_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// Bytes of the store's page cache (sled's estimate; RSS runs above it).
    #[arg(long, env = "ASYNCGATE_CACHE_CAPACITY", default_value = "16MiB", value_parser = parse_cache_capacity)]
    pub cache_capacity: u64,

    /// HTTP worker threads [default: one per core].
    #[arg(long, env = "ASYNCGATE_WORKERS")]
    pub workers: Option<usize>,

    /// Enables the admin API (`/admin/...`) behind `Authorization: Bearer
    /// <token>`; without it `/admin/...` answers 404. Not empty.
    #[arg(long, env = "ASYNCGATE_ADMIN_TOKEN", hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub admin_token: Option<String>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Base URL of the running gateway, http:// or https:// (with
    /// --ops-listen, the operations listener's).
    #[arg(
        long,
        env = "ASYNCGATE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,

    /// The gateway's `--admin-token` (before or after the subcommand).
    #[arg(
        long,
        env = "ASYNCGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub admin_token: Option<String>,

    /// PEM file of extra CA certificates to trust for an https:// gateway
    /// [default: the public web roots only].
    #[arg(long, env = "ASYNCGATE_ADMIN_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminAction {
    /// List requests in a status, oldest first (JSON).
    List {
        /// enqueued, started, done or unknown.
        #[arg(long, default_value = "unknown")]
        status: String,
        /// Items per page, 1 to 1000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Run an `unknown` request once more, at the tail of its queue.
    Requeue { id: String },
    /// Delete a `done` or `unknown` request and its response.
    Delete { id: String },
}

/// A PostgreSQL URL (`postgres://` or `postgresql://`), checked whole
/// before anything starts.
fn parse_store_url(s: &str) -> Result<String, String> {
    if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        return Err("expected postgres://user:password@host:port/database".into());
    }
    s.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    Ok(s.to_string())
}

impl GatewayArgs {
    pub fn key_file(&self) -> PathBuf {
        self.credential_key_file.clone().unwrap_or_else(|| {
            let mut p = self.data_dir.clone().into_os_string();
            p.push(".key");
            PathBuf::from(p)
        })
    }
}

/// `90s`, `15m`, `1h30m`, `24h`, `7d`, `250ms` (humantime's forms, so
/// `1h 30m` and `2days` too); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 90s, 15m, 1h30m, 24h or 7d ({e})"))
}

/// A timeout: a duration above zero (a zero one would fail every try
/// before it starts).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "`{s}` is no time at all; a timeout must be above zero"
        )),
        d => Ok(d),
    }
}

/// `--cache-capacity`: a size of at least 1 MiB (sled refuses caches
/// below 256 bytes with a panic, and a cache of a few KiB reads the disk
/// for every record).
pub fn parse_cache_capacity(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if n < 1 << 20 => Err(format!("`{s}` is below the least page cache, 1MiB")),
        n => Ok(n),
    }
}

/// `--public-url`: an absolute `http`/`https` URL with a host, no query,
/// fragment or `user:password@` (it is handed to every client), returned as
/// the URL parser writes it (so `response_url` is a well-formed URL
/// whatever the case or default port typed) without its trailing slash, so
/// that `response_url` is this plus `/async_api/...`. Anything else would
/// make every `response_url` wrong, so it stops the start.
pub fn parse_public_url(s: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!("`{s}` {why}; --public-url takes an absolute URL like https://gateway.example.com")
    };
    let url = url::Url::parse(s).map_err(|e| bad(&format!("is not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("is not an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "has a query or fragment, which the paths joined to it would break",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "carries user:password@, which every client would be given",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// `10MiB`, `512KiB`, `1GiB`, `10MB`, or plain bytes; units in any case
/// (`10mb` is `10MB`). `K`, `M` and `G` alone are binary, as they always
/// were here: a crate that reads them as decimal would quietly shrink a
/// configured `10M` by 5%.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size like 10MiB, 512KiB or 1048576");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let mult: u64 = match s[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2days"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in [
            "",
            "h",
            "3x",
            "1h30",
            "-1s",
            "90 x",
            "99999999999999999999d",
            "18446744073709551615d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("10mb"), parse_size("10MB"));
        assert_eq!(parse_size("10mb"), Ok(10_000_000));
        assert_eq!(parse_size("10mib"), Ok(10 << 20));
        assert_eq!(parse_size("512kib"), Ok(512 << 10));
        assert_eq!(parse_size("1gb"), Ok(1_000_000_000));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10 xb").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn timeouts_and_the_cache_have_a_floor() {
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        for zero in ["0", "0s", "0ms"] {
            assert!(parse_timeout(zero).is_err(), "{zero}");
        }
        assert_eq!(parse_cache_capacity("1MiB"), Ok(1 << 20));
        for small in ["0", "1", "100", "1KiB", "1023KiB"] {
            assert!(parse_cache_capacity(small).is_err(), "{small}");
        }
        let args = [
            "asyncgate",
            "serve",
            "--upstream",
            "http://u",
            "--cache-capacity",
            "100",
        ];
        assert!(Cli::try_parse_from(args).is_err());
        let args = |token| {
            [
                "asyncgate",
                "serve",
                "--upstream",
                "http://u",
                "--admin-token",
                token,
            ]
        };
        assert!(Cli::try_parse_from(args("t")).is_ok());
        assert!(
            Cli::try_parse_from(args("")).is_err(),
            "an empty admin token"
        );
    }

    #[test]
    fn public_urls_are_absolute_http_bases_without_a_trailing_slash() {
        for (given, kept) in [
            ("https://gateway.example.com", "https://gateway.example.com"),
            (
                "https://gateway.example.com/",
                "https://gateway.example.com",
            ),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
            (
                "https://gateway.example.com/prefix/",
                "https://gateway.example.com/prefix",
            ),
            (
                "HTTPS://Gateway.Example.com:443/x",
                "https://gateway.example.com/x",
            ),
            ("http://[::1]:8080", "http://[::1]:8080"),
        ] {
            assert_eq!(parse_public_url(given).as_deref(), Ok(kept), "{given}");
        }
        for bad in [
            "gateway.example.com",
            "gateway.example.com:8080",
            "/async",
            "",
            "ftp://gateway.example.com",
            "mailto:ops@gateway.example.com",
            "https://",
            "https://gateway.example.com:99999",
            "https://gateway.example.com/?x=1",
            "https://gateway.example.com?",
            "https://gateway.example.com/#top",
            "https://ops:secret@gateway.example.com",
        ] {
            let e = parse_public_url(bad).expect_err(bad);
            assert!(e.contains("--public-url") || e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_public_url_that_is_not_a_url_stops_the_parse() {
        let serve = |url: &str| {
            Cli::try_parse_from([
                "asyncgate",
                "serve",
                "--upstream",
                "http://x",
                "--public-url",
                url,
            ])
        };
        let e = serve("gateway.example.com").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let Command::Serve(a) = serve("https://gateway.example.com/").unwrap().command else {
            panic!()
        };
        assert_eq!(
            a.gateway.public_url.as_deref(),
            Some("https://gateway.example.com")
        );
    }

    #[test]
    fn serve_requires_an_upstream() {
        assert!(Cli::try_parse_from(["asyncgate", "serve"]).is_err());
        let cli = Cli::try_parse_from(["asyncgate", "serve", "--upstream", "http://x"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.gateway.key_file(), PathBuf::from("./asyncgate-data.key"));
        assert_eq!(a.gateway.retention, Duration::from_secs(86400));
    }
}
