//! Which seccomp filter a container's worker loads, compiled here so that a profile that cannot
//! be compiled fails Create with the reason.

use std::sync::OnceLock;

use kiln_plan::Seccomp;
use kiln_sandbox::seccomp::{Filter, audit_filter, compile, default_filter};

/// `KILN_SECCOMP=off` in containerd's environment turns Kiln's own allowlist off (for
/// containers whose spec has no profile), `KILN_SECCOMP=log` logs what it would refuse
/// instead; a spec's profile is always applied.
const ENV: &str = "KILN_SECCOMP";

/// The filter for `policy`, or `None` when the allowlist is turned off.
pub fn filter(policy: &Seccomp) -> Result<Option<Filter>, String> {
    match policy {
        Seccomp::Profile(profile) => compile(profile)
            .map(Some)
            .map_err(|e| format!("linux.seccomp: {e}")),
        Seccomp::Default => {
            let mode = std::env::var(ENV).unwrap_or_default();
            if mode == "off" {
                return Ok(None);
            }
            // Compiled once per shim: every container without a profile gets the same one.
            static DEFAULT: OnceLock<Result<Filter, String>> = OnceLock::new();
            DEFAULT
                .get_or_init(|| {
                    match mode.as_str() {
                        "log" => audit_filter(),
                        _ => default_filter(),
                    }
                    .map_err(|e| e.to_string())
                })
                .clone()
                .map(Some)
        }
    }
}
