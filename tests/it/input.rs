//! Input that must be refused (SPEC §1, §8), ids that cannot be guessed
//! (§0), and the credential key check at start (§6).

use asyncgate::model::RequestId;

use crate::helpers::*;

/// The random part of an id: its low 80 bits.
fn random_part(id: &str) -> u128 {
    let id: RequestId = id.parse().unwrap();
    u128::from_be_bytes(id.0) & ((1 << 80) - 1)
}

#[actix_web::test]
async fn ids_handed_out_together_are_not_neighbours() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let submissions = (0..50).map(|_| app.submit_as("POST", "/async_api/v2/x.json", "Bearer a"));
    let ids = futures_util::future::join_all(submissions).await;
    let mut random: Vec<u128> = ids.iter().map(|id| random_part(id)).collect();
    random.sort_unstable();
    for pair in random.windows(2) {
        // Fresh 80-bit values: two within 2^20 of each other would be an
        // increment (the old generator's +1), not chance.
        assert!(
            pair[1] - pair[0] > 1 << 20,
            "{:x} and {:x}",
            pair[0],
            pair[1]
        );
    }
    app.stop().await;
}
