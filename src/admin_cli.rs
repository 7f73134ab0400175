//! `asyncgate admin list|requeue|delete`: an operator's client for a
//! running gateway's admin API, over http:// or https://. Prints the
//! answer's JSON (or what was done, for an answer without a body); exits
//! non-zero on anything but a 2xx.

use std::time::Duration;

use crate::config::{AdminAction, AdminArgs};
use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no admin token: give --admin-token (before or after the subcommand) or set ASYNCGATE_ADMIN_TOKEN"
    )]
    NoToken,
    #[error("{0}")]
    Tls(String),
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    #[error("{0} answered {1}: {2}")]
    Refused(String, u16, String),
}

/// Runs one admin call; returns the text to print.
pub async fn run(args: &AdminArgs) -> Result<String, AdminError> {
    let token = args.admin_token.as_deref().ok_or(AdminError::NoToken)?;
    let base = args.url.trim_end_matches('/');
    let (method, url) = match &args.action {
        AdminAction::List {
            status,
            limit,
            after,
        } => {
            let mut q = vec![("status", status.clone()), ("limit", limit.to_string())];
            if let Some(a) = after {
                q.push(("after", a.clone()));
            }
            let q = serde_urlencoded::to_string(q).unwrap_or_default();
            (awc::http::Method::GET, format!("{base}/admin/requests?{q}"))
        }
        AdminAction::Requeue { id } => (
            awc::http::Method::POST,
            format!("{base}/admin/requests/{id}/requeue"),
        ),
        AdminAction::Delete { id } => (
            awc::http::Method::DELETE,
            format!("{base}/admin/requests/{id}"),
        ),
    };
    // The same TLS settings as for an https upstream: the public roots plus
    // an optional private CA (a gateway behind a TLS proxy of its own).
    let tls = upstream::tls_config(args.ca_file.as_deref())
        .map_err(|e| AdminError::Tls(e.to_string()))?;
    let connector = awc::Connector::new()
        .rustls_0_23(tls)
        .timeout(Duration::from_secs(10));
    let client = awc::Client::builder()
        .connector(connector)
        .timeout(Duration::from_secs(30))
        .finish();
    let mut res = client
        .request(method, url.as_str())
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send()
        .await
        .map_err(|e| AdminError::Unreachable(base.to_string(), e.to_string()))?;
    let body = res
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| AdminError::Unreachable(base.to_string(), e.to_string()))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !res.status().is_success() {
        return Err(AdminError::Refused(
            base.to_string(),
            res.status().as_u16(),
            text,
        ));
    }
    Ok(match &args.action {
        // 204: nothing to show but what was done.
        AdminAction::Delete { id } if text.is_empty() => {
            format!("deleted request {id} and its response")
        }
        _ => text,
    })
}
