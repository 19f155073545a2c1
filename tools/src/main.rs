//! `palaver`: developer CLI for Palaver (dev certificates, tokens, a terminal
//! chat client, a frame decoder).

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use palaver_credentials::{devcerts, TokenMinter};

mod chat;
use chat::{chat, ChatArgs};

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
        /// Leave out Apache Cassandra and the archiver: history is then only
        /// the routers' Redis window (the newest 10,000 messages of each
        /// conversation), and the stack needs ~1 GB less memory.
        #[arg(long)]
        no_archive: bool,
        /// Also start a push worker, `palaver-push --providers FILE` (the
        /// APNs/FCM credentials: push/README.md), so phones that are not
        /// connected get their notifications.
        #[arg(long, value_name = "FILE")]
        push_providers: Option<PathBuf>,
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

fn cluster(action: ClusterAction, dir: &std::path::Path) -> anyhow::Result<()> {
    use palaver_tools::cluster;
    match action {
        ClusterAction::Up {
            listen,
            data_dir,
            no_archive,
            push_providers,
        } => {
            let options = cluster::ClusterOptions {
                archive: !no_archive,
                push_providers,
            };
            let procs = cluster::cluster_up(dir, &data_dir, &listen, options)?;
            for p in &procs {
                println!("{:<9} pid {:<8} port {}", p.name, p.pid, p.port);
            }
            println!(
                "cluster up; logs in {}. Try: palaver chat --user alice --to bob --addr {listen}",
                dir.display()
            );
        }
        ClusterAction::Down => {
            let procs = cluster::cluster_down(dir)?;
            if procs.is_empty() {
                println!("no cluster recorded in {}", dir.display());
            }
            for p in procs {
                println!("stopped {} (pid {})", p.name, p.pid);
            }
        }
        ClusterAction::Status => {
            let procs = cluster::cluster_status(dir)?;
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
