//! Messages between the shim, the zygote and the workers, and their one encoder and decoder.
//!
//! Shim ↔ zygote: a `SOCK_SEQPACKET` socketpair, one message per packet (the kernel keeps the
//! boundaries), each at most [`MAX_PACKET`] bytes: a fixed header (magic, version, kind, the
//! request's token) and a JSON body. The token is in the header, not the body, so that a body
//! that cannot be decoded still gets an answer for its request instead of leaving it waiting.
//! A spawn request carries the worker's end of a fresh socketpair (SCM_RIGHTS); a spawn reply
//! carries the worker's pidfd.
//!
//! Shim ↔ worker: the worker reports [`WorkerReport`] as one JSON line (at most
//! [`MAX_REPORT`] bytes), the shim sends [`START_BYTE`] when containerd starts the task.

use std::path::PathBuf;

use kiln_plan::Plan;
use serde::{Deserialize, Serialize};

/// Largest packet either side sends.
pub const MAX_PACKET: usize = 1 << 20;

/// Largest setup report a worker may send.
pub const MAX_REPORT: usize = 64 << 10;

/// The byte the shim writes to a worker to let it run guest code.
pub const START_BYTE: u8 = b'S';

/// The byte the shim sends, with a memfd, in answer to [`WorkerReport::NeedModule`].
pub const MODULE_BYTE: u8 = b'M';

const MAGIC: [u8; 2] = *b"KZ";
const VERSION: u8 = 1;
const HEADER: usize = 12;

/// Where the worker's stdio goes: containerd's FIFO paths (or `file://` URIs); empty means
/// `/dev/null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    /// stdin path.
    pub stdin: String,
    /// stdout path.
    pub stdout: String,
    /// stderr path.
    pub stderr: String,
}

/// Shim → zygote: fork a worker for this plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// What to run.
    pub plan: Plan,
    /// Where stdio goes.
    pub stdio: Stdio,
    /// `cgroup.procs` files the worker writes its pid to before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// On cgroup v2: the container's cgroup directory, which the zygote clones the worker
    /// straight into (`clone3` with `CLONE_INTO_CGROUP`). When that works, the worker skips
    /// `cgroup_procs`; on a kernel without it, the worker writes them as on v1.
    #[serde(default)]
    pub clone_into: Option<PathBuf>,
    /// The compile cache root.
    pub cache_root: PathBuf,
    /// The container's log pipe (containerd's `log` FIFO in its bundle), if any.
    pub log_path: Option<PathBuf>,
    /// The seccomp filter the worker loads last (compiled by the shim from the spec's profile
    /// or Kiln's allowlist); `None` when turned off.
    #[serde(default)]
    pub seccomp: Option<kiln_sandbox::seccomp::Filter>,
    /// The filesystem whose inode numbers the rootfs's files report (see
    /// `kiln_cache::Index`), when the shim could establish it.
    #[serde(default)]
    pub fs_dev: Option<u64>,
}

/// Zygote → shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZygoteEvent {
    /// A worker was forked for the request with this packet's token; its pidfd comes with
    /// the packet. The worker is the shim's child (`CLONE_PARENT`): the shim reaps it.
    Spawned {
        /// The worker's pid, in the shim's pid namespace.
        pid: i32,
    },
    /// The request could not be decoded or the fork failed.
    SpawnFailed {
        /// Why.
        error: String,
    },
}

/// Worker → shim, once, after setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerReport {
    /// In its cgroup and namespaces, module loaded, waiting for [`START_BYTE`].
    Ready {
        /// How the module was obtained (`hit`, `miss`, `replaced`, `uncached`, `baseline`).
        cache: String,
        /// Microseconds spent loading or compiling the module.
        load_us: u64,
    },
    /// The module is a layer of the container's image and the compile cache does not have
    /// it: the shim answers with [`MODULE_BYTE`] and a sealed memfd holding the layer
    /// (`SCM_RIGHTS`), then reads the next report.
    NeedModule {
        /// `sha256:<hex>`: the layer.
        digest: String,
    },
    /// Setup failed; the worker exits.
    Failed {
        /// What went wrong, for the user.
        error: String,
    },
}

/// Why a packet could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The message would not fit in a packet.
    #[error("message of {0} bytes exceeds the {MAX_PACKET}-byte packet limit")]
    TooLarge(usize),
    /// Not a Kiln packet, or of another version.
    #[error("bad packet header")]
    Header,
    /// The body did not decode.
    #[error("undecodable message body: {0}")]
    Body(String),
}

/// The two kinds of packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request = 1,
    Event = 2,
}

fn encode<T: Serialize>(kind: Kind, token: u64, body: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&token.to_le_bytes());
    serde_json::to_writer(&mut out, body).map_err(|e| ProtocolError::Body(e.to_string()))?;
    if out.len() > MAX_PACKET {
        return Err(ProtocolError::TooLarge(out.len()));
    }
    Ok(out)
}

/// The token of a packet, if its header is whole: so that a request whose body does not
/// decode can still be answered.
pub fn token(packet: &[u8]) -> Option<u64> {
    if packet.len() < HEADER || packet[..2] != MAGIC || packet[2] != VERSION {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&packet[4..12]);
    Some(u64::from_le_bytes(t))
}

fn decode<T: for<'de> Deserialize<'de>>(
    kind: Kind,
    packet: &[u8],
) -> Result<(u64, T), ProtocolError> {
    let token = token(packet).ok_or(ProtocolError::Header)?;
    if packet[3] != kind as u8 {
        return Err(ProtocolError::Header);
    }
    let body = serde_json::from_slice(&packet[HEADER..])
        .map_err(|e| ProtocolError::Body(e.to_string()))?;
    Ok((token, body))
}

/// Encodes a spawn request.
pub fn encode_request(token: u64, req: &SpawnRequest) -> Result<Vec<u8>, ProtocolError> {
    encode(Kind::Request, token, req)
}

/// Decodes a spawn request.
pub fn decode_request(packet: &[u8]) -> Result<(u64, SpawnRequest), ProtocolError> {
    decode(Kind::Request, packet)
}

/// Encodes an event for the request `token`.
pub fn encode_event(token: u64, ev: &ZygoteEvent) -> Result<Vec<u8>, ProtocolError> {
    encode(Kind::Event, token, ev)
}

/// Decodes an event.
pub fn decode_event(packet: &[u8]) -> Result<(u64, ZygoteEvent), ProtocolError> {
    decode(Kind::Event, packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_their_token() {
        let ev = ZygoteEvent::Spawned { pid: 42 };
        let p = encode_event(7, &ev).expect("encode");
        assert_eq!(decode_event(&p).expect("decode"), (7, ev));
        assert!(decode_request(&p).is_err(), "an event is not a request");
    }

    #[test]
    fn a_bad_body_keeps_its_token_and_a_bad_header_is_refused() {
        let mut p =
            encode_event(9, &ZygoteEvent::SpawnFailed { error: "x".into() }).expect("encode");
        p.truncate(HEADER + 3);
        assert_eq!(token(&p), Some(9));
        assert!(matches!(decode_event(&p), Err(ProtocolError::Body(_))));
        assert_eq!(token(b"XX\x01\x02"), None);
        assert_eq!(decode_event(b"nonsense packet"), Err(ProtocolError::Header));
    }

    #[test]
    fn a_message_larger_than_a_packet_is_refused_when_encoding() {
        let ev = ZygoteEvent::SpawnFailed {
            error: "e".repeat(MAX_PACKET),
        };
        assert!(matches!(
            encode_event(1, &ev),
            Err(ProtocolError::TooLarge(_))
        ));
    }
}
