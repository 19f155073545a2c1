//! `palaver`: developer CLI for Palaver (dev certificates, tokens, a terminal
//! chat client, a frame decoder).

#![forbid(unsafe_code)]

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use palaver_credentials::{devcerts, TokenMinter};
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{text_send, Client, ConnectOptions};

#[derive(Parser)]
#[command(name = "palaver", version, about = "Palaver developer tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a dev CA and a server certificate/key signed by it (overwrites).
    Certs {
        /// Output directory (.palaver is where palaver-gateway looks).
        #[arg(long, default_value = ".palaver")]
        out: PathBuf,
        /// Host names / IPs for the server certificate, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
        host: Vec<String>,
    },
    /// Mint a JWT the gateway accepts (the dev HS256 secret by default).
    Token {
        /// User id (claim `sub`): 1..64 of [A-Za-z0-9_.@-].
        #[arg(long)]
        user: String,
        /// Bind the token to this device id (claim `device`).
        #[arg(long)]
        device: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: i64,
        /// Directory holding the dev secret (created if missing, as the gateway does).
        #[arg(long, default_value = ".palaver")]
        data_dir: PathBuf,
        /// HS256 secret file instead of the dev secret.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Ed25519 private key (PKCS#8 PEM): mint an EdDSA token instead.
        #[arg(long, value_name = "FILE")]
        ed25519_key: Option<PathBuf>,
    },
    /// Terminal chat client: lines typed are sent; arrivals are printed.
    /// Commands: /to PEER, /group ID, /create TITLE USER.., /history, /presence USER.., /read, /quit
    Chat {
        /// Your user id.
        #[arg(long)]
        user: String,
        /// Chat 1:1 with this user.
        #[arg(long, conflicts_with = "group")]
        to: Option<String>,
        /// Chat in this group (id with or without the `grp:` prefix).
        #[arg(long)]
        group: Option<String>,
        /// Gateway address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        addr: String,
        /// CA certificate to trust. [default: <data-dir>/ca.pem]
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Name to verify the server certificate against. [default: host of --addr, or localhost]
        #[arg(long)]
        server_name: Option<String>,
        /// Token to use instead of minting one with the dev secret.
        #[arg(long)]
        token: Option<String>,
        /// Device id.
        #[arg(long, default_value = "cli")]
        device: String,
        /// Directory holding the dev CA and secret.
        #[arg(long, default_value = ".palaver")]
        data_dir: PathBuf,
    },
    /// Decode length-delimited frames given as hex (or `-` to read hex from stdin).
    Decode {
        /// Hex bytes, or `-`.
        input: String,
    },
    /// A local cluster to try: Redis (AOF), Apache Kafka (KRaft), one router, two gateways.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
        /// State, logs and service data.
        #[arg(long, default_value = ".palaver/cluster", global = true)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start everything in the background (gateways gw1 and gw2 share --listen).
    Up {
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Dev certificate and JWT secret of the gateways (what `palaver chat` reads).
        #[arg(long, default_value = ".palaver")]
        data_dir: PathBuf,
    },
    /// Stop what `up` started.
    Down,
    /// Show the processes and whether they run.
    Status,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs { out, host } => certs(out, host),
        Command::Token {
            user,
            device,
            ttl,
            data_dir,
            secret_file,
            ed25519_key,
        } => mint(
            &user,
            device.as_deref(),
            ttl,
            &data_dir,
            secret_file,
            ed25519_key,
        )
        .map(|t| println!("{t}")),
        Command::Chat {
            user,
            to,
            group,
            addr,
            ca,
            server_name,
            token,
            device,
            data_dir,
        } => chat(ChatArgs {
            user,
            to,
            group,
            addr,
            ca,
            server_name,
            token,
            device,
            data_dir,
        }),
        Command::Decode { input } => decode(&input),
        Command::Cluster { action, dir } => cluster(action, &dir),
    };
    if let Err(e) = result {
        eprintln!("palaver: error: {e:#}");
        std::process::exit(1);
    }
}

fn certs(out: PathBuf, hosts: Vec<String>) -> anyhow::Result<()> {
    let paths = devcerts::write_dev_certs(&out, &hosts)?;
    println!("CA certificate:     {}", paths.ca_cert.display());
    println!("server certificate: {}", paths.server_cert.display());
    println!("server key:         {}", paths.server_key.display());
    println!(
        "start a gateway with: palaver-gateway --tls-cert {} --tls-key {}",
        paths.server_cert.display(),
        paths.server_key.display()
    );
    Ok(())
}

fn mint(
    user: &str,
    device: Option<&str>,
    ttl: i64,
    data_dir: &std::path::Path,
    secret_file: Option<PathBuf>,
    ed25519_key: Option<PathBuf>,
) -> anyhow::Result<String> {
    if !palaver_protocol::is_valid_id(user) {
        bail!("--user {user:?}: must be 1..64 characters of [A-Za-z0-9_.@-]");
    }
    if let Some(d) = device {
        if !palaver_protocol::is_valid_id(d) {
            bail!("--device {d:?}: must be 1..64 characters of [A-Za-z0-9_.@-]");
        }
    }
    let minter = match (ed25519_key, secret_file) {
        (Some(key), _) => TokenMinter::eddsa_from_file(&key)?,
        (None, Some(secret)) => TokenMinter::hs256_from_file(&secret)?,
        (None, None) => TokenMinter::hs256_from_file(&devcerts::ensure_jwt_secret(data_dir)?)?,
    };
    minter.mint_for(user, device, ttl)
}

fn decode(input: &str) -> anyhow::Result<()> {
    let text = if input == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        input.to_string()
    };
    let (frames, tail) = palaver_tools::decode::decode_hex(&text)?;
    for f in &frames {
        println!("{f:#?}");
    }
    if tail > 0 {
        eprintln!("({tail} trailing bytes do not form a complete frame)");
    }
    Ok(())
}

struct ChatArgs {
    user: String,
    to: Option<String>,
    group: Option<String>,
    addr: String,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    token: Option<String>,
    device: String,
    data_dir: PathBuf,
}

fn group_id(id: &str) -> String {
    if id.starts_with(palaver_protocol::GROUP_PREFIX) {
        id.to_string()
    } else {
        format!("{}{id}", palaver_protocol::GROUP_PREFIX)
    }
}

fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let ca =
        a.ca.clone()
            .unwrap_or_else(|| a.data_dir.join(devcerts::CA_CERT_FILE));
    if !ca.exists() {
        bail!(
            "CA file {} not found: start palaver-gateway in this directory first, or pass --ca",
            ca.display()
        );
    }
    let mut opts = ConnectOptions::from_files(&a.addr, &ca)?;
    if let Some(name) = &a.server_name {
        opts.server_name = name.clone();
    }
    let token = match &a.token {
        Some(t) => t.clone(),
        None => mint(&a.user, None, 86_400, &a.data_dir, None, None)?,
    };
    let mut client = Client::connect(&opts).with_context(|| format!("connecting to {}", a.addr))?;
    let welcome = client.hello(&token, &a.device, Duration::from_secs(10))?;
    println!(
        "connected as {} (session {}, heartbeat {} ms)",
        welcome.user_id, welcome.session_id, welcome.heartbeat_interval_ms
    );
    let me = welcome.user_id.clone();
    let mut conversation = match (&a.to, &a.group) {
        (Some(peer), _) => Some(palaver_protocol::direct_conversation_id(&me, peer)),
        (_, Some(g)) => Some(group_id(g)),
        _ => None,
    };
    match &conversation {
        Some(c) => println!("talking in {c}; type a line to send it, /quit to leave"),
        None => println!("no conversation chosen: use /to PEER or /group ID"),
    }
    client.request(Body::Sync(pb::Sync::default()))?;

    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let ping_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(1000)));
    let mut last_ping = Instant::now();
    let mut last_seq: std::collections::HashMap<String, u64> = Default::default();
    loop {
        if let Some(f) = client.recv(Duration::from_millis(100))? {
            if !show(&mut client, &me, f, &mut last_seq)? {
                return Ok(());
            }
        }
        loop {
            match lines.try_recv() {
                Ok(line) => {
                    if !command(&mut client, &me, &line, &mut conversation, &last_seq)? {
                        return Ok(());
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()), // stdin closed
            }
        }
        if last_ping.elapsed() >= ping_every {
            client.request(Body::Ping(pb::Ping {
                nonce: rand::random(),
            }))?;
            last_ping = Instant::now();
        }
    }
}

/// Handles one typed line. Returns false to quit.
fn command(
    client: &mut Client,
    me: &str,
    line: &str,
    conversation: &mut Option<String>,
    last_seq: &std::collections::HashMap<String, u64>,
) -> anyhow::Result<bool> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(true);
    }
    let mut words = line.split_whitespace();
    match words.next().unwrap_or("") {
        "/quit" => return Ok(false),
        "/to" => match words.next() {
            Some(peer) => {
                let c = palaver_protocol::direct_conversation_id(me, peer);
                println!("talking in {c}");
                *conversation = Some(c);
            }
            None => println!("usage: /to PEER"),
        },
        "/group" => match words.next() {
            Some(g) => {
                let c = group_id(g);
                println!("talking in {c}");
                *conversation = Some(c);
            }
            None => println!("usage: /group ID"),
        },
        "/create" => {
            let Some(title) = words.next() else {
                println!("usage: /create TITLE USER..");
                return Ok(true);
            };
            client.request(Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group as i32,
                title: title.to_string(),
                member_user_ids: words.map(str::to_string).collect(),
            }))?;
        }
        "/history" => match conversation {
            Some(c) => {
                client.request(Body::History(pb::History {
                    conversation_id: c.clone(),
                    before_seq: 0,
                    limit: 20,
                }))?;
            }
            None => println!("choose a conversation first"),
        },
        "/presence" => {
            let users: Vec<String> = words.map(str::to_string).collect();
            client.request(Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: users,
                unsubscribe: false,
            }))?;
        }
        "/read" => match conversation {
            Some(c) => {
                let seq = last_seq.get(c.as_str()).copied().unwrap_or(0);
                client.request(Body::Receipt(pb::Receipt {
                    conversation_id: c.clone(),
                    kind: pb::ReceiptKind::Read as i32,
                    up_to_seq: seq,
                }))?;
            }
            None => println!("choose a conversation first"),
        },
        w if w.starts_with('/') => {
            println!("commands: /to PEER, /group ID, /create TITLE USER.., /history, /presence USER.., /read, /quit")
        }
        _ => match conversation {
            Some(c) => {
                client.request(text_send(c, line))?;
            }
            None => println!("choose a conversation first: /to PEER or /group ID"),
        },
    }
    Ok(true)
}

fn print_message(m: &pb::Message) {
    println!(
        "[{} #{}] {}: {}",
        m.conversation_id,
        m.seq,
        m.sender_user_id,
        String::from_utf8_lossy(&m.body)
    );
}

/// Prints an arrival (and acks deliveries). Returns false when the server
/// ends the session.
fn show(
    client: &mut Client,
    me: &str,
    f: pb::Frame,
    last_seq: &mut std::collections::HashMap<String, u64>,
) -> anyhow::Result<bool> {
    let Some(body) = f.body else { return Ok(true) };
    match body {
        Body::Deliver(d) => {
            if let Some(m) = d.message {
                print_message(&m);
                last_seq.insert(m.conversation_id.clone(), m.seq);
                if m.sender_user_id != me {
                    client.request(Body::Receipt(pb::Receipt {
                        conversation_id: m.conversation_id,
                        kind: pb::ReceiptKind::Delivered as i32,
                        up_to_seq: m.seq,
                    }))?;
                }
            }
        }
        Body::SendAck(a) => println!("  (sent #{} in {})", a.seq, a.conversation_id),
        Body::SyncBatch(b) => {
            for m in &b.messages {
                print_message(m);
                last_seq.insert(m.conversation_id.clone(), m.seq);
            }
            if b.has_more {
                let cursors = last_seq
                    .iter()
                    .map(|(c, s)| pb::Cursor {
                        conversation_id: c.clone(),
                        after_seq: *s,
                    })
                    .collect();
                client.request(Body::Sync(pb::Sync { cursors, limit: 0 }))?;
            }
        }
        Body::HistoryPage(p) => {
            for m in &p.messages {
                print_message(m);
            }
        }
        Body::ReceiptUpdate(r) => {
            let kind = if r.kind == pb::ReceiptKind::Read as i32 {
                "read"
            } else {
                "received"
            };
            println!(
                "  ({} {kind} up to #{} in {})",
                r.user_id, r.up_to_seq, r.conversation_id
            );
        }
        Body::Typing(t) => {
            if t.active {
                println!("  ({} is typing in {})", t.user_id, t.conversation_id);
            }
        }
        Body::PresenceResult(r) => {
            for p in r.presences {
                println!(
                    "  ({} is {})",
                    p.user_id,
                    if p.online { "online" } else { "offline" }
                );
            }
        }
        Body::PresenceEvent(e) => {
            if let Some(p) = e.presence {
                println!(
                    "  ({} is now {})",
                    p.user_id,
                    if p.online { "online" } else { "offline" }
                );
            }
        }
        Body::ConversationCreated(c) => {
            if let Some(c) = c.conversation {
                println!(
                    "  (created {} \"{}\"; /group {} to talk there)",
                    c.conversation_id, c.title, c.conversation_id
                );
            }
        }
        Body::MembersChanged(m) => {
            if let Some(c) = m.conversation {
                println!(
                    "  ({} changed members of {}: +{:?} -{:?})",
                    m.actor_user_id, c.conversation_id, m.added_user_ids, m.removed_user_ids
                );
            }
        }
        Body::Error(e) => println!("! error {}: {}", e.code, e.message),
        Body::GoAway(g) => {
            println!("! server sent GoAway ({}): {}", g.reason, g.message);
            return Ok(false);
        }
        Body::Pong(_) => {}
        other => println!("  {other:?}"),
    }
    Ok(true)
}

fn cluster(action: ClusterAction, dir: &std::path::Path) -> anyhow::Result<()> {
    use palaver_testkit::stack;
    match action {
        ClusterAction::Up { listen, data_dir } => {
            let procs = stack::cluster_up(dir, &data_dir, &listen)?;
            for p in &procs {
                println!("{:<9} pid {:<8} port {}", p.name, p.pid, p.port);
            }
            println!(
                "cluster up; logs in {}. Try: palaver chat --user alice --to bob --addr {listen}",
                dir.display()
            );
        }
        ClusterAction::Down => {
            let procs = stack::cluster_down(dir)?;
            if procs.is_empty() {
                println!("no cluster recorded in {}", dir.display());
            }
            for p in procs {
                println!("stopped {} (pid {})", p.name, p.pid);
            }
        }
        ClusterAction::Status => {
            let procs = stack::cluster_status(dir)?;
            if procs.is_empty() {
                println!("no cluster recorded in {}", dir.display());
            }
            for (p, alive) in procs {
                let state = if alive { "running" } else { "stopped" };
                println!("{:<9} pid {:<8} port {:<6} {state}", p.name, p.pid, p.port);
            }
        }
    }
    Ok(())
}
