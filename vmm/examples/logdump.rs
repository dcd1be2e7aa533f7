fn main() {
    let p = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(30);
    let f = std::io::BufReader::new(std::fs::File::open(p).unwrap());
    let (mut r, h) = logchannel::LogReader::open(f).unwrap();
    println!("{h:?}");
    let mut i = 0;
    while let Some(rec) = r.next_record().unwrap() {
        if i < n {
            println!("{} {} {:?}", rec.seq, rec.pos, rec.event);
        }
        i += 1;
    }
    println!("total {i}");
}
