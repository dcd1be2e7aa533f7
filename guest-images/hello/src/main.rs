//! `hello`: the smallest useful guest. It proves the boot path, the serial
//! port, the paravirtual clock and the CMOS RTC, then powers off with 0.
//!
//! Output:
//! ```text
//! Hello from Duet
//! clock_ns=<decimal>
//! rtc=YYYY-MM-DD HH:MM:SS
//! ```

#![no_std]
#![no_main]

use duet_rt::{clock_ns, println, rtc};

duet_rt::entry!(main, pit_hz = 100);

fn main() {
    println!("Hello from Duet");
    println!("clock_ns={}", clock_ns());
    let t = rtc::now();
    println!(
        "rtc={:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    );
}
