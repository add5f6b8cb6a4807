//! What travels on the control queues: requests, completion statuses and unsolicited events,
//! and their encoding as [`CtrlEntry`]s. [`Status`] is also the status code of the control
//! socket.

use std::fmt;
use std::net::Ipv4Addr;

use crate::layout::{CtrlEntry, MachnetFlow, OP_CLOSE, OP_COMPLETE, OP_CONNECT, OP_EVENT, OP_LISTEN};

/// Outcome code of a control request (queue completion or socket reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok,
    /// Malformed or unknown request.
    BadRequest,
    /// Protocol version not supported.
    BadVersion,
    /// The connection has not registered.
    NotRegistered,
    /// The connection is already registered.
    AlreadyRegistered,
    /// No such channel.
    NoSuchChannel,
    /// Out of channels, buffers, ports or memory.
    NoResources,
    /// The address is not one of the daemon's local addresses.
    AddrNotLocal,
    /// The address and port are already in use.
    AddrInUse,
    /// No such flow (or not owned by this channel).
    NoSuchFlow,
    /// The peer cannot be reached.
    Unreachable,
    /// The operation timed out.
    TimedOut,
    /// The peer refused (reset) the connection.
    Refused,
    /// Not allowed.
    NotPermitted,
    /// The flow or channel was closed.
    Closed,
    /// Daemon-internal failure.
    Internal,
    /// A code this version does not know.
    Unknown(u32),
}

impl Status {
    /// The wire code.
    pub const fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::BadRequest => 1,
            Status::BadVersion => 2,
            Status::NotRegistered => 3,
            Status::AlreadyRegistered => 4,
            Status::NoSuchChannel => 5,
            Status::NoResources => 6,
            Status::AddrNotLocal => 7,
            Status::AddrInUse => 8,
            Status::NoSuchFlow => 9,
            Status::Unreachable => 10,
            Status::TimedOut => 11,
            Status::Refused => 12,
            Status::NotPermitted => 13,
            Status::Closed => 14,
            Status::Internal => 15,
            Status::Unknown(c) => c,
        }
    }

    /// Decodes a wire code.
    pub const fn from_code(c: u32) -> Status {
        match c {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::BadVersion,
            3 => Status::NotRegistered,
            4 => Status::AlreadyRegistered,
            5 => Status::NoSuchChannel,
            6 => Status::NoResources,
            7 => Status::AddrNotLocal,
            8 => Status::AddrInUse,
            9 => Status::NoSuchFlow,
            10 => Status::Unreachable,
            11 => Status::TimedOut,
            12 => Status::Refused,
            13 => Status::NotPermitted,
            14 => Status::Closed,
            15 => Status::Internal,
            c => Status::Unknown(c),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad request",
            Status::BadVersion => "unsupported protocol version",
            Status::NotRegistered => "not registered",
            Status::AlreadyRegistered => "already registered",
            Status::NoSuchChannel => "no such channel",
            Status::NoResources => "out of resources",
            Status::AddrNotLocal => "address is not local",
            Status::AddrInUse => "address in use",
            Status::NoSuchFlow => "no such flow",
            Status::Unreachable => "peer unreachable",
            Status::TimedOut => "timed out",
            Status::Refused => "connection refused",
            Status::NotPermitted => "not permitted",
            Status::Closed => "closed",
            Status::Internal => "internal error",
            Status::Unknown(c) => return write!(f, "unknown status {c}"),
        };
        f.write_str(s)
    }
}

/// A control request an application submits on its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlOp {
    /// Accept connections on `ip:port`.
    Listen {
        /// Local address.
        ip: Ipv4Addr,
        /// Local port.
        port: u16,
    },
    /// Open a flow from `local_ip` to `remote_ip:remote_port`; the completion carries the flow
    /// `{src = local:chosen port, dst = remote}`.
    Connect {
        /// Local address.
        local_ip: Ipv4Addr,
        /// Remote address.
        remote_ip: Ipv4Addr,
        /// Remote port.
        remote_port: u16,
    },
    /// Close a flow this channel owns.
    Close {
        /// The flow, as the application sends on it.
        flow: MachnetFlow,
    },
}

impl CtrlOp {
    /// Encodes the request with id `id`.
    pub fn encode(self, id: u64) -> CtrlEntry {
        let (op, flow) = match self {
            CtrlOp::Listen { ip, port } => {
                (OP_LISTEN, MachnetFlow { src_ip: ip.to_bits(), src_port: port, ..Default::default() })
            }
            CtrlOp::Connect { local_ip, remote_ip, remote_port } => (
                OP_CONNECT,
                MachnetFlow {
                    src_ip: local_ip.to_bits(),
                    dst_ip: remote_ip.to_bits(),
                    src_port: 0,
                    dst_port: remote_port,
                },
            ),
            CtrlOp::Close { flow } => (OP_CLOSE, flow),
        };
        CtrlEntry { id, op, status: 0, flow, aux: 0 }
    }

    /// Decodes a request entry; `None` for an unknown opcode.
    pub fn decode(e: &CtrlEntry) -> Option<CtrlOp> {
        Some(match e.op {
            OP_LISTEN => CtrlOp::Listen { ip: Ipv4Addr::from_bits(e.flow.src_ip), port: e.flow.src_port },
            OP_CONNECT => CtrlOp::Connect {
                local_ip: Ipv4Addr::from_bits(e.flow.src_ip),
                remote_ip: Ipv4Addr::from_bits(e.flow.dst_ip),
                remote_port: e.flow.dst_port,
            },
            OP_CLOSE => CtrlOp::Close { flow: e.flow },
            _ => return None,
        })
    }
}

/// Kinds of unsolicited events (completion entries with id 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The peer closed the flow (or the daemon closed it); no more messages will arrive on it.
    FlowClosed,
    /// The flow failed (retransmissions exhausted, peer reset).
    FlowFailed,
    /// A message was refused (for example: sent on a flow this channel does not own); its
    /// buffers went back to the application.
    TxRefused,
    /// The application broke the channel protocol (`status` = [`Violation`] code, `aux` = the
    /// offending buffer index or request id when there is one).
    ///
    /// [`Violation`]: crate::engine::Violation
    Violation,
    /// A kind this version does not know.
    Unknown(u32),
}

impl EventKind {
    /// The wire code (low bits of `op`).
    pub const fn code(self) -> u32 {
        match self {
            EventKind::FlowClosed => 1,
            EventKind::FlowFailed => 2,
            EventKind::TxRefused => 3,
            EventKind::Violation => 4,
            EventKind::Unknown(c) => c,
        }
    }

    /// Decodes a wire code.
    pub const fn from_code(c: u32) -> EventKind {
        match c {
            1 => EventKind::FlowClosed,
            2 => EventKind::FlowFailed,
            3 => EventKind::TxRefused,
            4 => EventKind::Violation,
            c => EventKind::Unknown(c),
        }
    }
}

/// An unsolicited event from the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The flow concerned (as the application sends on it), or all-zero.
    pub flow: MachnetFlow,
    /// Why.
    pub status: Status,
    /// Kind-specific detail.
    pub aux: u32,
}

impl Event {
    /// Encodes the event.
    pub fn encode(self) -> CtrlEntry {
        CtrlEntry { id: 0, op: OP_EVENT | self.kind.code(), status: self.status.code(), flow: self.flow, aux: self.aux }
    }
}

/// What a completion-queue entry means to the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The answer to request `id`.
    Done {
        /// Request id.
        id: u64,
        /// Outcome; on success the flow (connect: the new flow; listen: the listening address).
        result: Result<MachnetFlow, Status>,
    },
    /// An unsolicited event.
    Event(Event),
}

impl Completion {
    /// Encodes the answer to request `id`.
    pub fn done(id: u64, result: Result<MachnetFlow, Status>) -> CtrlEntry {
        let (status, flow) = match result {
            Ok(f) => (0, f),
            Err(Status::Ok) => (Status::Internal.code(), MachnetFlow::default()),
            Err(s) => (s.code(), MachnetFlow::default()),
        };
        CtrlEntry { id, op: OP_COMPLETE, status, flow, aux: 0 }
    }

    /// Decodes a completion-queue entry.
    pub fn decode(e: &CtrlEntry) -> Completion {
        if e.id == 0 && e.op & !0xFF == OP_EVENT {
            return Completion::Event(Event {
                kind: EventKind::from_code(e.op & 0xFF),
                flow: e.flow,
                status: Status::from_code(e.status),
                aux: e.aux,
            });
        }
        let result = match Status::from_code(e.status) {
            Status::Ok => Ok(e.flow),
            s => Err(s),
        };
        Completion::Done { id: e.id, result }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in 0..20 {
            assert_eq!(Status::from_code(c).code(), c);
            assert_eq!(EventKind::from_code(c).code(), c);
        }
        assert_eq!(Status::AddrInUse.to_string(), "address in use");
    }

    #[test]
    fn requests_and_completions_round_trip() {
        let ops = [
            CtrlOp::Listen { ip: Ipv4Addr::new(198, 18, 0, 1), port: 888 },
            CtrlOp::Connect {
                local_ip: Ipv4Addr::new(198, 18, 0, 1),
                remote_ip: Ipv4Addr::new(198, 18, 0, 2),
                remote_port: 999,
            },
            CtrlOp::Close { flow: MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 } },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            assert_eq!(CtrlOp::decode(&op.encode(i as u64 + 1)), Some(op));
        }
        assert_eq!(CtrlOp::decode(&CtrlEntry { op: 77, ..Default::default() }), None);
        let f = MachnetFlow { src_ip: 9, dst_ip: 8, src_port: 7, dst_port: 6 };
        assert_eq!(Completion::decode(&Completion::done(5, Ok(f))), Completion::Done { id: 5, result: Ok(f) });
        assert_eq!(
            Completion::decode(&Completion::done(6, Err(Status::AddrInUse))),
            Completion::Done { id: 6, result: Err(Status::AddrInUse) }
        );
        let ev = Event { kind: EventKind::FlowClosed, flow: f, status: Status::Closed, aux: 3 };
        assert_eq!(Completion::decode(&ev.encode()), Completion::Event(ev));
    }
}
