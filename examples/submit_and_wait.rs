//! A client script's whole job against asyncgate: submit, poll the status
//! until it is `done` (303), fetch the stored response.
//!
//!     cargo run --release -- demo                       # in one terminal
//!     cargo run --example submit_and_wait -- http://127.0.0.1:8080 /async_api/v2/campaigns.json
//!
//! A status of `unknown` means the gateway lost track after sending (SPEC
//! §2): a person has to look, so the script stops there.

use std::time::Duration;

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gateway = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let path = args
        .next()
        .unwrap_or_else(|| "/async_api/v2/campaigns.json".into());
    let token = std::env::var("TOKEN").unwrap_or_else(|_| "Bearer example-token".into());
    let client = awc::Client::builder().disable_redirects().finish();

    let mut res = client
        .post(format!("{gateway}{path}"))
        .insert_header(("Authorization", token.as_str()))
        .insert_header(("Content-Type", "application/json"))
        .send_body(r#"{"name": "example"}"#)
        .await?;
    let accepted: serde_json::Value = res.json().await?;
    if res.status().as_u16() != 202 {
        return Err(format!("not accepted: {} {accepted}", res.status()).into());
    }
    let status_url = format!(
        "{gateway}{}",
        res.headers()
            .get("location")
            .ok_or("no Location")?
            .to_str()?
    );
    println!("accepted: {accepted}");

    loop {
        let mut res = client
            .get(&status_url)
            .insert_header(("Authorization", token.as_str()))
            .send()
            .await?;
        let status: serde_json::Value = res.json().await?;
        match (res.status().as_u16(), status["status"].as_str()) {
            (303, _) => {
                println!("done: {status}");
                let location = res
                    .headers()
                    .get("location")
                    .ok_or("no Location")?
                    .to_str()?;
                let url = if location.starts_with('/') {
                    format!("{gateway}{location}")
                } else {
                    location.to_string()
                };
                let mut answer = client
                    .get(url)
                    .insert_header(("Authorization", token.as_str()))
                    .send()
                    .await?;
                let body = answer.body().limit(64 << 20).await?;
                println!(
                    "upstream answered {}: {}",
                    answer.status(),
                    String::from_utf8_lossy(&body)
                );
                return Ok(());
            }
            (200, Some("unknown")) => {
                return Err(format!("unknown, needs an operator: {status}").into());
            }
            (200, _) => tokio::time::sleep(Duration::from_millis(200)).await,
            (code, _) => return Err(format!("status answered {code}: {status}").into()),
        }
    }
}
