//! asyncgate: an asynchronous API gateway. A client swaps `/api/` for
//! `/async_api/` in a URL, gets `202 Accepted` and a status URL at once;
//! asyncgate stores the request durably, runs it later against the upstream
//! paced by the upstream's own limits, keeps the whole response for a day,
//! and tells the client by polling or by a callback. The contract is
//! `docs/SPEC.md` in the repository.
//!
//! # Layout
//!
//! Data flows one way: HTTP in → store → scheduler → upstream → store →
//! callback / HTTP out.
//!
//! - [`config`]: the command-line flags (each with an `ASYNCGATE_*` variable).
//! - [`app`]: starts and stops everything; the only module that knows all.
//! - [`model`]: request ids, stored records, statuses and their transitions.
//! - [`store`]: sled trees behind domain operations; group-committed fsyncs.
//! - [`scheduler`]: pure lane, fairness, pacing and backoff policy.
//! - [`dispatcher`]: the execution loop tying scheduler, store and upstream.
//! - [`upstream`]: sends one request with awc and classifies the outcome.
//! - [`net`]: outbound TCP under awc: callback address policy, cut answers.
//! - [`callback`]: delivers stored callback events with retries, signed
//!   (Standard Webhooks) with `--callback-secret-file`.
//! - [`sweeper`]: deletes requests past their retention.
//! - [`http`]: routes, handlers, views, the one error-to-HTTP mapping.
//! - [`crypto`]: sealing credentials at rest, salted ownership hashes.
//! - [`metrics`]: counters and histograms in the Prometheus text format.
//! - [`logging`]: `RUST_LOG` levels, text or JSON lines (`--log-format`).
//! - [`demo`]: the bundled demo upstream behind `asyncgate demo`.
//! - [`admin_cli`]: `asyncgate admin ...`, an operator's client.
//! - [`cli_docs`]: `asyncgate completions` and `asyncgate man`, made from
//!   [`config`]'s definitions.

pub mod admin_cli;
pub mod app;
pub mod callback;
pub mod cli_docs;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod dispatcher;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod net;
pub mod scheduler;
pub mod store;
pub mod sweeper;
pub mod upstream;
