//! The Redis-compatible server logic shared by Duet's key-value guests
//! (`kv` on COM1, `netkv` on TCP): RESP2 request parsing ([`parse`]) and
//! the command set ([`command`]), with [`serve`] tying them together over a
//! byte stream.
//!
//! It speaks PING, ECHO, SET, GET, INCR, INCRBY, DEL, EXISTS, DBSIZE,
//! CONFIG GET (always empty) and QUIT, in multibulk or inline form,
//! pipelined or not, with binary-safe values. The transport (what a byte
//! stream is, when a connection ends) stays with the image.

#![no_std]

extern crate alloc;

pub mod command;
pub mod parse;

use alloc::vec::Vec;

pub use command::{execute, Db};
pub use parse::Parsed;

/// Why [`serve`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every whole request was answered; what is left (if anything) is the
    /// start of the next one.
    NeedMore,
    /// A valid QUIT was answered (`+OK`). Redis closes the connection here
    /// and ignores what follows; a transport that cannot close may go on.
    Quit,
    /// The client broke the protocol: the error reply is written and the
    /// rest of the input counts as used. Redis closes the connection.
    ProtocolError,
    /// The replies reached the caller's limit; the rest of the input is
    /// left for later (back-pressure on a slow reader).
    OutputFull,
}

/// What [`serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Bytes of the input consumed.
    pub used: usize,
    /// Why it stopped.
    pub stop: Stop,
}

/// Answers every whole request at the front of `input`, in order, appending
/// the replies to `out`, until the input runs out, a QUIT, a protocol
/// error, or `out` holding at least `max_out` bytes.
pub fn serve(db: &mut Db, input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Served {
    let mut used = 0;
    loop {
        if out.len() >= max_out {
            return Served {
                used,
                stop: Stop::OutputFull,
            };
        }
        match parse::parse(&input[used..]) {
            Parsed::Command(args, n) => {
                used += n;
                if args.is_empty() {
                    continue;
                }
                execute(db, &args, out);
                if args.len() == 1 && args[0].eq_ignore_ascii_case(b"QUIT") {
                    return Served {
                        used,
                        stop: Stop::Quit,
                    };
                }
            }
            Parsed::Incomplete => {
                return Served {
                    used,
                    stop: Stop::NeedMore,
                }
            }
            Parsed::Error(msg) => {
                command::error(out, msg.as_bytes());
                return Served {
                    used: input.len(),
                    stop: Stop::ProtocolError,
                };
            }
        }
    }
}
