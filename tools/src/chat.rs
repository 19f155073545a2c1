//! `palaver chat`: a terminal client on the client SDK (palaver-client), so
//! the CLI reconnects, resends and syncs like an app does. Lines typed are
//! sent; arrivals, receipts, presence and connection states are printed by
//! the SDK's event thread.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context};
use palaver_client::{
    direct_conversation_id, ChatMessage, ClientConfig, ClientEvent, ConnectionState,
    DisconnectCause, EventListener, ListenerError, PalaverClient, ReceiptKind, TokenError,
    TokenProvider,
};
use palaver_credentials::devcerts;

pub struct ChatArgs {
    pub user: String,
    pub to: Option<String>,
    pub group: Option<String>,
    pub addr: String,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub token: Option<String>,
    pub device: String,
    pub data_dir: PathBuf,
}

fn group_id(id: &str) -> String {
    if id.starts_with(palaver_protocol::GROUP_PREFIX) {
        id.to_string()
    } else {
        format!("{}{id}", palaver_protocol::GROUP_PREFIX)
    }
}

/// The token given with --token, or one minted with the dev secret (a
/// fresh one whenever the SDK asks, e.g. after TOKEN_EXPIRED).
struct Tokens {
    fixed: Option<String>,
    user: String,
    data_dir: PathBuf,
}

impl TokenProvider for Tokens {
    fn fetch_token(&self, _force_refresh: bool) -> Result<String, TokenError> {
        if let Some(t) = &self.fixed {
            return Ok(t.clone());
        }
        crate::mint(&self.user, None, 86_400, &self.data_dir, None, None).map_err(|e| {
            TokenError::Denied {
                detail: format!("{e:#}"),
            }
        })
    }
}

enum Input {
    Line(String),
    /// The session ended for good (REPLACED, refused token).
    Ended,
}

/// Prints what the SDK reports.
struct Printer {
    /// Highest seq seen per conversation (for /read).
    last_seq: Mutex<HashMap<String, u64>>,
    input: Mutex<mpsc::Sender<Input>>,
}

fn print_message(m: &ChatMessage) {
    println!(
        "[{} #{}] {}: {}",
        m.conversation_id,
        m.seq,
        m.sender_user_id,
        m.text()
    );
}

impl Printer {
    fn seen(&self, conversation: &str, seq: u64) {
        if let Ok(mut l) = self.last_seq.lock() {
            let s = l.entry(conversation.to_string()).or_insert(0);
            *s = (*s).max(seq);
        }
    }

    fn ended(&self) {
        if let Ok(tx) = self.input.lock() {
            let _ = tx.send(Input::Ended);
        }
    }
}

impl EventListener for Printer {
    fn on_event(&self, event: ClientEvent) -> Result<(), ListenerError> {
        self.print(event);
        Ok(())
    }
}

impl Printer {
    fn print(&self, event: ClientEvent) {
        match event {
            ClientEvent::StateChanged { state } => match state {
                ConnectionState::Connected {
                    user_id,
                    session_id,
                } => println!("connected as {user_id} (session {session_id})"),
                ConnectionState::Connecting {
                    attempt,
                    retry_in_ms,
                    last_failure,
                } if attempt > 0 => {
                    let why = last_failure.map(|f| format!(" ({f:?})")).unwrap_or_default();
                    println!(
                        "! not connected{why}; next attempt in {retry_in_ms} ms (attempt {attempt})"
                    )
                }
                ConnectionState::Connecting { .. } | ConnectionState::Closed => {}
                ConnectionState::Disconnected { cause } => {
                    match cause {
                        Some(DisconnectCause::Replaced) => {
                            println!("! this device connected elsewhere (REPLACED)")
                        }
                        Some(DisconnectCause::Server { error }) => {
                            println!("! error {}: {}", error.raw_code, error.message)
                        }
                        Some(DisconnectCause::TokenUnavailable { message }) => {
                            println!("! no token: {message}")
                        }
                        Some(DisconnectCause::Failed { failure }) => {
                            println!("! cannot connect, retrying would not help: {failure:?}")
                        }
                        Some(DisconnectCause::Requested) | None => return,
                    }
                    self.ended();
                }
            },
            ClientEvent::Message { message } => {
                self.seen(&message.conversation_id, message.seq);
                print_message(&message);
            }
            ClientEvent::MessageSent {
                conversation_id,
                seq,
                ..
            } => {
                self.seen(&conversation_id, seq);
                println!("  (sent #{seq} in {conversation_id})");
            }
            ClientEvent::SendFailed { error, .. } => {
                println!("! not sent: error {}: {}", error.raw_code, error.message)
            }
            ClientEvent::Receipt {
                conversation_id,
                user_id,
                kind,
                up_to_seq,
            } => {
                let kind = match kind {
                    ReceiptKind::Read => "read",
                    ReceiptKind::Delivered => "received",
                };
                println!("  ({user_id} {kind} up to #{up_to_seq} in {conversation_id})");
            }
            ClientEvent::Typing {
                conversation_id,
                user_id,
                active: true,
            } => println!("  ({user_id} is typing in {conversation_id})"),
            ClientEvent::PresenceChanged { presence } => println!(
                "  ({} is {})",
                presence.user_id,
                if presence.online { "online" } else { "offline" }
            ),
            ClientEvent::ConversationResult { conversation, .. } => println!(
                "  (created {} \"{}\"; /group {} to talk there)",
                conversation.conversation_id, conversation.title, conversation.conversation_id
            ),
            ClientEvent::MembersChanged {
                conversation,
                actor_user_id,
                added_user_ids,
                removed_user_ids,
            } => println!(
                "  ({actor_user_id} changed members of {}: +{added_user_ids:?} -{removed_user_ids:?})",
                conversation.conversation_id
            ),
            ClientEvent::HistoryPage { messages, .. } => messages.iter().for_each(print_message),
            ClientEvent::RequestFailed { error, .. } => match error {
                Some(e) => println!("! error {}: {}", e.raw_code, e.message),
                None => println!("! connection lost before the answer; try again"),
            },
            ClientEvent::MessagesUnavailable {
                conversation_id,
                from_seq,
                to_seq,
            } => println!("  (#{from_seq}..#{to_seq} in {conversation_id} are no longer kept)"),
            _ => {}
        }
    }
}

pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let ca =
        a.ca.clone()
            .unwrap_or_else(|| a.data_dir.join(devcerts::CA_CERT_FILE));
    if !ca.exists() {
        bail!(
            "CA file {} not found: start palaver-gateway in this directory first, or pass --ca",
            ca.display()
        );
    }
    let ca_pem = std::fs::read_to_string(&ca)
        .with_context(|| format!("reading CA file {}", ca.display()))?;
    let mut config = ClientConfig::new(&a.addr, &ca_pem, &a.device);
    config.client_name = "palaver-cli".into();
    config.client_version = env!("CARGO_PKG_VERSION").into();
    if let Some(name) = &a.server_name {
        config.server_name = name.clone();
    }
    // Fail early on a bad user id or secret, as before the SDK.
    let tokens = Tokens {
        fixed: a.token.clone(),
        user: a.user.clone(),
        data_dir: a.data_dir.clone(),
    };
    if a.token.is_none() {
        crate::mint(&a.user, None, 86_400, &a.data_dir, None, None)?;
    }
    let (tx, inputs) = mpsc::channel::<Input>();
    let printer = Arc::new(Printer {
        last_seq: Mutex::default(),
        input: Mutex::new(tx.clone()),
    });
    let client = PalaverClient::new(config, Arc::new(tokens), printer.clone(), None)
        .with_context(|| format!("setting up a client for {}", a.addr))?;
    let me = a.user.clone();
    let mut conversation = match (&a.to, &a.group) {
        (Some(peer), _) => Some(direct_conversation_id(me.clone(), peer.clone())?),
        (_, Some(g)) => Some(group_id(g)),
        _ => None,
    };
    client.connect()?;
    match &conversation {
        Some(c) => println!("talking in {c}; type a line to send it, /quit to leave"),
        None => println!("no conversation chosen: use /to PEER or /group ID"),
    }

    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(Input::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Input::Ended); // stdin closed
    });

    for input in inputs {
        match input {
            Input::Line(line) => {
                if !command(&client, &printer, &me, &line, &mut conversation)? {
                    break;
                }
            }
            Input::Ended => break,
        }
    }
    client.shutdown();
    Ok(())
}

/// Handles one typed line. Returns false to quit.
fn command(
    client: &PalaverClient,
    printer: &Printer,
    me: &str,
    line: &str,
    conversation: &mut Option<String>,
) -> anyhow::Result<bool> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(true);
    }
    let mut words = line.split_whitespace();
    let result = match words.next().unwrap_or("") {
        "/quit" => return Ok(false),
        "/to" => match words.next() {
            Some(peer) => match direct_conversation_id(me.to_string(), peer.to_string()) {
                Ok(c) => {
                    println!("talking in {c}");
                    *conversation = Some(c);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            None => {
                println!("usage: /to PEER");
                Ok(())
            }
        },
        "/group" => {
            match words.next() {
                Some(g) => {
                    let c = group_id(g);
                    println!("talking in {c}");
                    *conversation = Some(c);
                }
                None => println!("usage: /group ID"),
            }
            Ok(())
        }
        "/create" => match words.next() {
            Some(title) => client
                .create_group(title.to_string(), words.map(str::to_string).collect())
                .map(drop),
            None => {
                println!("usage: /create TITLE USER..");
                Ok(())
            }
        },
        "/history" => match conversation {
            Some(c) => client.load_history(c.clone(), 0, 20).map(drop),
            None => {
                println!("choose a conversation first");
                Ok(())
            }
        },
        "/presence" => client.subscribe_presence(words.map(str::to_string).collect()),
        "/read" => match conversation {
            Some(c) => {
                let seq = printer
                    .last_seq
                    .lock()
                    .ok()
                    .and_then(|l| l.get(c.as_str()).copied())
                    .unwrap_or(0);
                client.mark_read(c.clone(), seq)
            }
            None => {
                println!("choose a conversation first");
                Ok(())
            }
        },
        w if w.starts_with('/') => {
            println!("commands: /to PEER, /group ID, /create TITLE USER.., /history, /presence USER.., /read, /quit");
            Ok(())
        }
        _ => match conversation {
            Some(c) => client.send_text(c.clone(), line.to_string()).map(drop),
            None => {
                println!("choose a conversation first: /to PEER or /group ID");
                Ok(())
            }
        },
    };
    if let Err(e) = result {
        println!("! {e}");
    }
    Ok(true)
}
