//! Input that must be refused (SPEC §1, §8), ids that cannot be guessed
//! (§0), and the credential key check at start (§6).
