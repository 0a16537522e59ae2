//! `wave-floor MEMBERS WAVES`: one process (the "server") holds `MEMBERS` accepted loopback
//! TCP connections and, five times a second, writes a 300-byte frame to each (a group event
//! as Courier's JSON protocol sends it) and reads a 60-byte ack back from each (a client's
//! `ack`); a second process (the "devices") holds the other ends, reads each frame and answers
//! it. No framing, no storage, no JSON: what the two cores pay for the system calls and the
//! kernel's TCP alone, for comparison with `courier bench group-fanout`
//! (`docs/benchmarks.md`, "The floor of a wave").
//!
//! Prints the time of each wave's writes (the last member's frame leaves then) and of the whole
//! wave (every ack read), and the CPU each process spent per delivery with its ack.

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FRAME: usize = 300;
const ACK: usize = 60;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("devices") => devices(&args[2], parse(&args[3], "members")),
        _ if args.len() == 3 => server(parse(&args[1], "members"), parse(&args[2], "waves")),
        _ => {
            eprintln!("usage: wave-floor MEMBERS WAVES");
            std::process::exit(2);
        }
    }
}

fn parse(value: &str, what: &str) -> usize {
    value.parse().unwrap_or_else(|_| {
        eprintln!("{what}: expected a number, got {value:?}");
        std::process::exit(2);
    })
}

/// The process's user and system CPU so far.
fn cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn server(members: usize, waves: usize) {
    let mut listener =
        TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))).unwrap();
    let address = listener.local_addr().unwrap();
    let mut devices = Command::new(std::env::current_exe().unwrap())
        .args(["devices", &address.to_string(), &members.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the devices' process");
    let mut poll = Poll::new().unwrap();
    poll.registry().register(&mut listener, Token(usize::MAX), Interest::READABLE).unwrap();
    let mut events = Events::with_capacity(1024);
    let mut sockets = Vec::with_capacity(members);
    while sockets.len() < members {
        poll.poll(&mut events, None).unwrap();
        loop {
            match listener.accept() {
                Ok((mut socket, _)) => {
                    socket.set_nodelay(true).unwrap();
                    let token = Token(sockets.len());
                    poll.registry().register(&mut socket, token, Interest::READABLE).unwrap();
                    sockets.push(socket);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
    let frame = [b'f'; FRAME];
    let mut buf = [0u8; 4096];
    let (mut writes, mut whole) = (Vec::new(), Vec::new());
    let cpu_before = cpu();
    for _ in 0..waves {
        let started = Instant::now();
        for socket in &mut sockets {
            socket.write_all(&frame).expect("a frame fits the socket's buffer");
        }
        writes.push(started.elapsed());
        let mut acked = 0;
        while acked < members * ACK {
            poll.poll(&mut events, None).unwrap();
            for event in &events {
                let socket = &mut sockets[event.token().0];
                loop {
                    match socket.read(&mut buf) {
                        Ok(0) => panic!("a device closed its connection"),
                        Ok(n) => acked += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("read: {e}"),
                    }
                }
            }
        }
        whole.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let server_cpu = cpu() - cpu_before;
    drop(sockets);
    let mut report = String::new();
    devices.stdout.take().unwrap().read_to_string(&mut report).unwrap();
    devices.wait().unwrap();
    let per_delivery = |d: Duration| d.as_secs_f64() * 1e6 / (members * waves) as f64;
    let devices_cpu = Duration::from_secs_f64(report.trim().parse::<f64>().unwrap_or(0.0));
    println!(
        "{members} members, {waves} waves: writes of a wave p50 {} / max {}; whole wave (every ack read) p50 {} / max {}",
        ms(&mut writes, 50),
        ms(&mut writes, 100),
        ms(&mut whole, 50),
        ms(&mut whole, 100),
    );
    println!(
        "CPU per delivery with its ack: server {:.1} us, devices {:.1} us",
        per_delivery(server_cpu),
        per_delivery(devices_cpu),
    );
}

/// The `pct`-th percentile of `times`, in milliseconds.
fn ms(times: &mut [Duration], pct: usize) -> String {
    times.sort();
    let index = ((times.len() - 1) * pct) / 100;
    format!("{:.1} ms", times[index].as_secs_f64() * 1e3)
}

fn devices(address: &str, members: usize) {
    let server: SocketAddr = address.parse().expect("the server's address");
    let mut poll = Poll::new().unwrap();
    let mut sockets = Vec::with_capacity(members);
    // Bytes of a frame each socket has read so far: a frame is acked once whole.
    let mut partial = vec![0usize; members];
    for i in 0..members {
        let mut socket = TcpStream::from_std(connect(server));
        poll.registry().register(&mut socket, Token(i), Interest::READABLE).unwrap();
        sockets.push(socket);
    }
    let ack = [b'a'; ACK];
    let mut buf = [0u8; 4096];
    let mut events = Events::with_capacity(1024);
    let cpu_before = cpu();
    let mut open = members;
    while open > 0 {
        poll.poll(&mut events, None).unwrap();
        for event in &events {
            let (socket, partial) = (&mut sockets[event.token().0], &mut partial[event.token().0]);
            loop {
                match socket.read(&mut buf) {
                    Ok(0) => {
                        open -= 1;
                        break;
                    }
                    Ok(n) => {
                        *partial += n;
                        for _ in 0..*partial / FRAME {
                            socket.write_all(&ack).expect("an ack fits the socket's buffer");
                        }
                        *partial %= FRAME;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }
    println!("{}", (cpu() - cpu_before).as_secs_f64());
}

/// A blocking connect, then non-blocking with `TCP_NODELAY`.
fn connect(server: SocketAddr) -> std::net::TcpStream {
    let socket = std::net::TcpStream::connect(server).expect("connect to the server");
    socket.set_nodelay(true).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}
