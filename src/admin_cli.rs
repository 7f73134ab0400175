//! `asyncgate admin list|requeue|delete`: an operator's client for a
//! running gateway's admin API. Prints the answer's JSON; exits non-zero
//! on anything but a 2xx.

use std::time::Duration;

use crate::config::{AdminAction, AdminArgs};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    #[error("{0} answered {1}: {2}")]
    Refused(String, u16, String),
}

/// Runs one admin call; returns the body to print.
pub async fn run(args: &AdminArgs) -> Result<String, AdminError> {
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
            ("GET", format!("{base}/admin/requests?{q}"))
        }
        AdminAction::Requeue { id } => ("POST", format!("{base}/admin/requests/{id}/requeue")),
        AdminAction::Delete { id } => ("DELETE", format!("{base}/admin/requests/{id}")),
    };
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap_or_default();
    let mut res = client
        .request(method, url.as_str())
        .insert_header(("Authorization", format!("Bearer {}", args.admin_token)))
        .send()
        .await
        .map_err(|e| AdminError::Unreachable(base.to_string(), e.to_string()))?;
    let body = res
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| AdminError::Unreachable(base.to_string(), e.to_string()))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if res.status().is_success() {
        Ok(text)
    } else {
        Err(AdminError::Refused(
            base.to_string(),
            res.status().as_u16(),
            text,
        ))
    }
}
