//! Integration tests: one crate (one link) for all of them. Each test
//! starts the real gateway on port 0 with a temporary data dir in front of
//! a fake upstream it scripts.

mod admin;
mod admin_cli;
mod backend;
mod callback;
mod callback_events;
mod callback_guard;
mod callback_signed;
mod cluster;
mod crash;
mod disk;
mod execute;
mod failures;
mod helpers;
mod hostile;
mod input;
mod lazyfs;
mod logs;
mod once;
mod openapi;
mod operable;
mod ops;
mod pacing;
mod packaging;
mod postgres;
mod powercut;
mod process;
mod retention;
mod scripts;
mod submit;
mod tls;
