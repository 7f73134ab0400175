//! Callbacks cannot be aimed inward (SPEC §9): `--callback-deny` and
//! `--callback-allow`, checked on the address actually connected to.
