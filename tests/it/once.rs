//! Sent once, whatever the upstream does (SPEC §5): hang-ups after
//! reading, cut answers, stale keep-alive connections, hostile
//! `Retry-After` values, failures inside the gateway before sending.
