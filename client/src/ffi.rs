//! The API apps use, the same from Rust, Kotlin and Swift (UniFFI): a
//! [`PalaverClient`] object, and three interfaces the app implements (or
//! takes from the SDK): [`TokenProvider`], [`EventListener`], [`ClientStore`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mio::Waker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::ClientConfig;
use palaver_protocol::pb;

use crate::engine::{Command, Engine, Request};
use crate::error::ClientError;
use crate::io::{self, IoThread, Shared};
use crate::types::*;

/// How long `shutdown()` waits for the I/O thread to close the connection
/// cleanly before it returns anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Why the token provider could not give a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum TokenError {
    /// Not now (offline, auth service down): the SDK retries with backoff.
    #[error("token unavailable: {detail}")]
    Unavailable { detail: String },
    /// Never (signed out): the SDK stops connecting until `connect()`.
    #[error("token denied: {detail}")]
    Denied { detail: String },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for TokenError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        TokenError::Unavailable { detail: e.reason }
    }
}

/// Gives the SDK the JWT for each Hello. Called on the SDK's I/O thread
/// before every connection attempt; `force_refresh` is true after the
/// server answered TOKEN_EXPIRED (or UNAUTHENTICATED once): return a new
/// token, not a cached one.
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    fn fetch_token(&self, force_refresh: bool) -> Result<String, TokenError>;
}

/// Receives every [`ClientEvent`], in order, on one SDK thread (not the
/// I/O thread: a slow listener does not stall the connection). It may call
/// back into the client.
///
/// Exceptions it throws are caught: reported to the log sink
/// ([`crate::log::set_log_sink`]) with the event lost to the app, and the
/// next event is delivered as usual.
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    fn on_event(&self, event: ClientEvent) -> Result<(), ListenerError>;
}

/// What a listener's exception becomes (any exception: Kotlin and Swift
/// implementations need not declare it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum ListenerError {
    #[error("{detail}")]
    Failed { detail: String },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for ListenerError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        ListenerError::Failed { detail: e.reason }
    }
}

/// Persistence for the outbox and the sync cursors, so neither an unsent
/// message nor the sync position is lost across app restarts. Implement it
/// over the app's database, or use [`memory_store`]. `save_outgoing` runs on
/// the thread calling `send_message` (before it returns: an accepted message
/// is stored); the others on the SDK's dispatch thread. Implementations must
/// not throw.
#[uniffi::export(with_foreign)]
pub trait ClientStore: Send + Sync {
    fn load_outbox(&self) -> Vec<OutgoingMessage>;
    fn save_outgoing(&self, message: OutgoingMessage);
    fn remove_outgoing(&self, client_msg_id: Vec<u8>);
    fn load_cursors(&self) -> Vec<SyncCursor>;
    fn save_cursor(&self, cursor: SyncCursor);
}

/// An in-memory [`ClientStore`]: survives reconnects, not process restarts.
/// Shared between two clients in a row, it stands in for a database in tests.
#[derive(Default)]
struct MemoryStore {
    outbox: Mutex<Vec<OutgoingMessage>>,
    /// conversation → (after_seq, history_epoch)
    cursors: Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

impl ClientStore for MemoryStore {
    fn load_outbox(&self) -> Vec<OutgoingMessage> {
        self.outbox.lock().map(|o| o.clone()).unwrap_or_default()
    }
    fn save_outgoing(&self, message: OutgoingMessage) {
        if let Ok(mut o) = self.outbox.lock() {
            o.push(message);
        }
    }
    fn remove_outgoing(&self, client_msg_id: Vec<u8>) {
        if let Ok(mut o) = self.outbox.lock() {
            o.retain(|m| m.client_msg_id != client_msg_id);
        }
    }
    fn load_cursors(&self) -> Vec<SyncCursor> {
        self.cursors
            .lock()
            .map(|c| {
                c.iter()
                    .map(|(id, &(after_seq, history_epoch))| SyncCursor {
                        conversation_id: id.clone(),
                        after_seq,
                        history_epoch,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    fn save_cursor(&self, cursor: SyncCursor) {
        if let Ok(mut c) = self.cursors.lock() {
            c.insert(
                cursor.conversation_id,
                (cursor.after_seq, cursor.history_epoch),
            );
        }
    }
}

/// A new in-memory store.
#[uniffi::export]
pub fn memory_store() -> Arc<dyn ClientStore> {
    Arc::new(MemoryStore::default())
}

/// The direct conversation id of two users (`dm:<a>:<b>`, sorted, SPEC §11).
#[uniffi::export]
pub fn direct_conversation_id(user_a: String, user_b: String) -> Result<String, ClientError> {
    for u in [&user_a, &user_b] {
        if !palaver_protocol::is_valid_id(u) {
            return Err(invalid(format!("{u:?} is not a valid user id")));
        }
    }
    if user_a == user_b {
        return Err(invalid("there is no conversation with oneself".into()));
    }
    Ok(palaver_protocol::direct_conversation_id(&user_a, &user_b))
}

fn invalid(message: String) -> ClientError {
    ClientError::InvalidArgument { detail: message }
}

/// Users one channel message may mention (SPEC §13, §21).
const MAX_MENTIONS: usize = 20;

fn check_conversation(id: &str) -> Result<(), ClientError> {
    if palaver_protocol::is_valid_conversation_id(id) {
        Ok(())
    } else {
        Err(invalid(format!("{id:?} is not a conversation id")))
    }
}

fn check_users(ids: &[String]) -> Result<(), ClientError> {
    match ids.iter().find(|u| !palaver_protocol::is_valid_id(u)) {
        Some(u) => Err(invalid(format!("{u:?} is not a valid user id"))),
        None => Ok(()),
    }
}

/// A Palaver connection that looks after itself: connects, reconnects,
/// resends, syncs. All methods return at once; results come as events.
#[derive(uniffi::Object)]
pub struct PalaverClient {
    commands: Mutex<Sender<Command>>,
    waker: Arc<Waker>,
    shared: Arc<Shared>,
    store: Arc<dyn ClientStore>,
    next_ticket: AtomicU64,
    next_order: AtomicU64,
    io_thread: Mutex<Option<JoinHandle<()>>>,
}

impl PalaverClient {
    fn command(&self, cmd: Command) -> Result<(), ClientError> {
        let sent = self
            .commands
            .lock()
            .map_err(|_| ClientError::Closed)?
            .send(cmd)
            .is_ok();
        if !sent {
            return Err(ClientError::Closed);
        }
        // A failed wake leaves the command for the next timer tick.
        let _ = self.waker.wake();
        Ok(())
    }

    fn ticket(&self, request: Request) -> Result<u64, ClientError> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.command(Command::Ticket { ticket, request })?;
        Ok(ticket)
    }
}

#[uniffi::export]
impl PalaverClient {
    /// Creates the client (loading the outbox and cursors from `store`, or
    /// an in-memory store when `None`). It does not connect until
    /// [`PalaverClient::connect`].
    #[uniffi::constructor]
    pub fn new(
        config: ClientConfig,
        token_provider: Arc<dyn TokenProvider>,
        listener: Arc<dyn EventListener>,
        store: Option<Arc<dyn ClientStore>>,
    ) -> Result<Arc<PalaverClient>, ClientError> {
        if !palaver_protocol::is_valid_id(&config.device_id) {
            return Err(invalid(
                "device_id must be 1..64 bytes of [A-Za-z0-9_.@-]".into(),
            ));
        }
        let cfg_err = |detail: String| ClientError::Config { detail };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(config.trusted_ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| cfg_err(format!("trusted_ca_pem: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| cfg_err(format!("trusted_ca_pem: {e}")))?;
        }
        if roots.is_empty() {
            return Err(cfg_err("trusted_ca_pem holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| cfg_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![palaver_protocol::ALPN.to_vec()];
        let server_name = ServerName::try_from(config.effective_server_name())
            .map_err(|e| cfg_err(format!("server name: {e}")))?;

        let store = store.unwrap_or_else(memory_store);
        let engine = Engine::new(
            config.clone(),
            store.load_outbox(),
            store.load_cursors(),
            rand::random(),
        );
        let next_order = engine.next_created_order();
        let (poll, waker) = io::new_poll().map_err(|e| cfg_err(format!("poll: {e}")))?;
        let (commands_tx, commands_rx) = io::channel();
        let (outputs_tx, outputs_rx): (Sender<_>, Receiver<_>) = io::channel();
        let shared = Arc::new(Shared::new(engine.state().clone(), engine.max_body_bytes()));
        let io = IoThread {
            engine,
            commands: commands_rx,
            poll,
            tokens: token_provider,
            tls: Arc::new(tls),
            server_name,
            address: config.address.clone(),
            outputs: outputs_tx,
            shared: shared.clone(),
        };
        let (dispatch_store, dispatch_shared) = (store.clone(), shared.clone());
        std::thread::Builder::new()
            .name("palaver-events".into())
            .spawn(move || io::dispatch(outputs_rx, listener, dispatch_store, dispatch_shared))
            .map_err(|e| cfg_err(format!("thread: {e}")))?;
        let io_thread = std::thread::Builder::new()
            .name("palaver-io".into())
            .spawn(move || io.run())
            .map_err(|e| cfg_err(format!("thread: {e}")))?;
        Ok(Arc::new(PalaverClient {
            commands: Mutex::new(commands_tx),
            waker,
            shared,
            store,
            next_ticket: AtomicU64::new(1),
            next_order: AtomicU64::new(next_order),
            io_thread: Mutex::new(Some(io_thread)),
        }))
    }

    /// Start connecting (and keep reconnecting) — also after REPLACED or a
    /// refused token, once the app has dealt with the cause.
    pub fn connect(&self) -> Result<(), ClientError> {
        self.command(Command::Connect)
    }

    /// Close the connection and stop reconnecting; the outbox is kept.
    pub fn disconnect(&self) -> Result<(), ClientError> {
        self.command(Command::Disconnect)
    }

    /// Disconnect for good and stop the SDK's I/O thread. Idempotent, and
    /// returns at once whatever the app's callbacks are doing (a token
    /// provider in a slow fetch included): the thread finishes on its own
    /// (a token fetched after this is not used), and no event reaches the
    /// listener after this returns. (Not `close`: Kotlin's
    /// AutoCloseable.close frees the native object.)
    pub fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.command(Command::Close);
        let handle = self.io_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            // A moment for a clean close (close_notify, FIN); never longer.
            if h.thread().id() != std::thread::current().id()
                && self.shared.wait_exited(SHUTDOWN_GRACE)
            {
                let _ = h.join();
            }
        }
    }

    pub fn state(&self) -> ConnectionState {
        // Closed at once, even while the I/O thread is still stuck in the
        // app's token provider and has not seen the Close yet.
        if self.shared.closed.load(Ordering::Acquire) {
            return ConnectionState::Closed;
        }
        self.shared
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(ConnectionState::Closed)
    }

    /// Queues a text message; returns its client_msg_id. It is stored in
    /// the outbox before this returns and sent (and resent, same id) until
    /// the server stores it: `MessageSent` or `SendFailed` follows.
    pub fn send_text(&self, conversation_id: String, text: String) -> Result<Vec<u8>, ClientError> {
        self.send_message(
            conversation_id,
            ContentKind::Text,
            text.into_bytes(),
            0,
            None,
        )
    }

    pub fn send_message(
        &self,
        conversation_id: String,
        kind: ContentKind,
        body: Vec<u8>,
        reply_to_seq: u64,
        media: Option<Media>,
    ) -> Result<Vec<u8>, ClientError> {
        self.send_mentioning(conversation_id, kind, body, reply_to_seq, media, Vec::new())
    }

    /// `send_message` to a channel, naming members to notify (SPEC §21: at
    /// most 20; those who are members get a push when they have no device
    /// online; nobody else is pushed for channel traffic).
    pub fn send_mentioning(
        &self,
        conversation_id: String,
        kind: ContentKind,
        body: Vec<u8>,
        reply_to_seq: u64,
        media: Option<Media>,
        mention_user_ids: Vec<String>,
    ) -> Result<Vec<u8>, ClientError> {
        check_conversation(&conversation_id)?;
        check_users(&mention_user_ids)?;
        if mention_user_ids.len() > MAX_MENTIONS {
            return Err(invalid(format!(
                "{} mentions, the most one message may name is {MAX_MENTIONS}",
                mention_user_ids.len()
            )));
        }
        if kind == ContentKind::Unspecified {
            return Err(invalid("kind must not be Unspecified".into()));
        }
        let max = self.shared.max_body_bytes.load(Ordering::Relaxed);
        if body.len() > max {
            return Err(ClientError::Server {
                code: crate::error::ErrorCode::BodyTooLarge,
                raw_code: 2005,
                detail: format!("body of {} bytes exceeds {max}", body.len()),
            });
        }
        let message = OutgoingMessage {
            client_msg_id: rand::random::<[u8; 16]>().to_vec(),
            conversation_id,
            kind,
            body,
            reply_to_seq,
            media,
            created_order: self.next_order.fetch_add(1, Ordering::Relaxed),
            mention_user_ids,
        };
        let id = message.client_msg_id.clone();
        self.store.save_outgoing(message.clone());
        self.command(Command::Send(message))?;
        Ok(id)
    }

    /// READ receipt up to `up_to_seq` (sent now, or after reconnecting).
    pub fn mark_read(&self, conversation_id: String, up_to_seq: u64) -> Result<(), ClientError> {
        check_conversation(&conversation_id)?;
        self.command(Command::Receipt {
            conversation_id,
            kind: ReceiptKind::Read,
            up_to_seq,
        })
    }

    /// DELIVERED receipt (the SDK sends these itself unless
    /// `auto_delivered_receipts` is off).
    pub fn mark_delivered(
        &self,
        conversation_id: String,
        up_to_seq: u64,
    ) -> Result<(), ClientError> {
        check_conversation(&conversation_id)?;
        self.command(Command::Receipt {
            conversation_id,
            kind: ReceiptKind::Delivered,
            up_to_seq,
        })
    }

    /// Call on every keystroke and when typing stops; the SDK sends at most
    /// one `active` per 3 s per conversation and drops it while offline.
    pub fn set_typing(&self, conversation_id: String, active: bool) -> Result<(), ClientError> {
        check_conversation(&conversation_id)?;
        self.command(Command::Typing {
            conversation_id,
            active,
        })
    }

    /// Watch users' presence; kept across reconnects. `Presence` events.
    pub fn subscribe_presence(&self, user_ids: Vec<String>) -> Result<(), ClientError> {
        check_users(&user_ids)?;
        self.command(Command::Presence {
            user_ids,
            unsubscribe: false,
        })
    }

    pub fn unsubscribe_presence(&self, user_ids: Vec<String>) -> Result<(), ClientError> {
        check_users(&user_ids)?;
        self.command(Command::Presence {
            user_ids,
            unsubscribe: true,
        })
    }

    /// One-off presence lookup: `PresenceResult { ticket }`.
    pub fn query_presence(&self, user_ids: Vec<String>) -> Result<u64, ClientError> {
        check_users(&user_ids)?;
        self.ticket(Request::PresenceQuery { user_ids })
    }

    /// A page of older messages (`before_seq` 0 = newest): `HistoryPage`.
    pub fn load_history(
        &self,
        conversation_id: String,
        before_seq: u64,
        limit: u32,
    ) -> Result<u64, ClientError> {
        check_conversation(&conversation_id)?;
        self.ticket(Request::History {
            conversation_id,
            before_seq,
            limit,
        })
    }

    /// Creates a group of this user (admin) and `member_user_ids`:
    /// `ConversationResult` or `RequestFailed`.
    pub fn create_group(
        &self,
        title: String,
        member_user_ids: Vec<String>,
    ) -> Result<u64, ClientError> {
        check_users(&member_user_ids)?;
        self.ticket(Request::CreateConversation {
            kind: ConversationKind::Group,
            title,
            member_user_ids,
            channel: None,
        })
    }

    /// Creates a channel (SPEC §21: up to 100,000 members, delivered live
    /// only where opened) of this user (admin) and `member_user_ids`:
    /// `public` lets anyone join with `change_members` adding themselves,
    /// `admins_only_post` makes it an announcement channel.
    /// `ConversationResult` or `RequestFailed`.
    pub fn create_channel(
        &self,
        title: String,
        member_user_ids: Vec<String>,
        settings: ChannelSettings,
    ) -> Result<u64, ClientError> {
        check_users(&member_user_ids)?;
        self.ticket(Request::CreateConversation {
            kind: ConversationKind::Channel,
            title,
            member_user_ids,
            channel: Some(pb::ChannelSettings {
                public: settings.public,
                admins_only_post: settings.admins_only_post,
            }),
        })
    }

    /// What this client receives of a channel it is a member of (SPEC
    /// §21): `Live` while it is on screen (each `Message` and `Typing`),
    /// `Counts` while it is in a list (`ChannelActivity`, batched),
    /// `Closed` for nothing live. Kept across reconnects until changed;
    /// `ChannelOpened` answers it each time, `ChannelOpenFailed` if refused.
    pub fn open_channel(
        &self,
        conversation_id: String,
        mode: ChannelMode,
    ) -> Result<(), ClientError> {
        check_conversation(&conversation_id)?;
        if !palaver_protocol::is_channel_id(&conversation_id) {
            return Err(invalid(format!("{conversation_id} is not a channel")));
        }
        self.command(Command::OpenChannel {
            conversation_id,
            mode,
        })
    }

    /// A page of a conversation's members, ascending by user id, after
    /// `after_user_id` (None: from the start), at most `limit` (0: the
    /// server's default): `MemberPage` or `RequestFailed`.
    pub fn list_members(
        &self,
        conversation_id: String,
        after_user_id: Option<String>,
        limit: u32,
    ) -> Result<u64, ClientError> {
        check_conversation(&conversation_id)?;
        self.ticket(Request::ListMembers {
            conversation_id,
            after_user_id: after_user_id.unwrap_or_default(),
            limit,
        })
    }

    /// Lists the direct conversation with `peer_user_id` for both users.
    pub fn open_direct(&self, peer_user_id: String) -> Result<u64, ClientError> {
        check_users(std::slice::from_ref(&peer_user_id))?;
        self.ticket(Request::CreateConversation {
            kind: ConversationKind::Direct,
            title: String::new(),
            member_user_ids: vec![peer_user_id],
            channel: None,
        })
    }

    /// Adds, removes (yourself: leave) and promotes members of a group.
    pub fn change_members(
        &self,
        conversation_id: String,
        add: Vec<String>,
        remove: Vec<String>,
        promote: Vec<String>,
    ) -> Result<u64, ClientError> {
        check_conversation(&conversation_id)?;
        for list in [&add, &remove, &promote] {
            check_users(list)?;
        }
        self.ticket(Request::ChangeMembers {
            conversation_id,
            add,
            remove,
            promote,
        })
    }

    /// Sync now (the SDK already syncs after every connect and on gaps).
    pub fn sync_now(&self) -> Result<(), ClientError> {
        self.command(Command::SyncNow)
    }

    /// While `Connecting` waits out its backoff, try at once: call it when
    /// the app comes to the foreground or the network comes back. Does
    /// nothing in other states (`connect()` restarts a stopped client).
    pub fn reconnect_now(&self) -> Result<(), ClientError> {
        self.command(Command::ReconnectNow)
    }

    /// Registers this device for APNs pushes (SPEC §20) with the device
    /// token iOS gave the app (the raw bytes; the SDK sends them in hex),
    /// `sandbox` for development builds (`aps-environment`), `topic` the
    /// app's bundle id, `locale` an optional BCP 47 tag. Replaces the
    /// device's previous registration. `PushTokenRegistered` or
    /// `RequestFailed`. Call it whenever iOS hands the app a token.
    pub fn register_apns_token(
        &self,
        device_token: Vec<u8>,
        sandbox: bool,
        topic: String,
        locale: Option<String>,
    ) -> Result<u64, ClientError> {
        let environment = if sandbox {
            pb::ApnsEnvironment::Sandbox
        } else {
            pb::ApnsEnvironment::Production
        };
        self.register_push(pb::RegisterPushToken {
            platform: pb::PushPlatform::Apns.into(),
            token: device_token.iter().map(|b| format!("{b:02x}")).collect(),
            apns_environment: environment.into(),
            apns_topic: topic,
            locale: locale.unwrap_or_default(),
        })
    }

    /// Registers this device for FCM pushes with its registration token
    /// (SPEC §20); as `register_apns_token` otherwise.
    pub fn register_fcm_token(
        &self,
        token: String,
        locale: Option<String>,
    ) -> Result<u64, ClientError> {
        self.register_push(pb::RegisterPushToken {
            platform: pb::PushPlatform::Fcm.into(),
            token,
            apns_environment: 0,
            apns_topic: String::new(),
            locale: locale.unwrap_or_default(),
        })
    }

    /// This device gets no more pushes (e.g. at sign-out, before
    /// `shutdown`). `PushTokenUnregistered` or `RequestFailed`.
    pub fn unregister_push_token(&self) -> Result<u64, ClientError> {
        self.ticket(Request::UnregisterPushToken)
    }

    /// Mutes pushes of a conversation for this user on all devices (SPEC
    /// §20): until `until_ms` (Unix ms, in the future, at most 366 days
    /// ahead), or for ever when `None`. Messages still arrive. `MuteChanged`
    /// or `RequestFailed`.
    pub fn mute_conversation(
        &self,
        conversation_id: String,
        until_ms: Option<i64>,
    ) -> Result<u64, ClientError> {
        check_conversation(&conversation_id)?;
        let (muted_until_ms, forever) = match until_ms {
            None => (0, true),
            Some(ms) if ms > 0 => (ms, false),
            Some(ms) => return Err(invalid(format!("until_ms {ms} is not a Unix time in ms"))),
        };
        self.ticket(Request::MuteConversation {
            conversation_id,
            muted_until_ms,
            forever,
        })
    }

    /// Pushes of the conversation again. `MuteChanged` or `RequestFailed`.
    pub fn unmute_conversation(&self, conversation_id: String) -> Result<u64, ClientError> {
        check_conversation(&conversation_id)?;
        self.ticket(Request::MuteConversation {
            conversation_id,
            muted_until_ms: 0,
            forever: false,
        })
    }
}

impl PalaverClient {
    fn register_push(&self, register: pb::RegisterPushToken) -> Result<u64, ClientError> {
        palaver_protocol::push::check_register(&register).map_err(invalid)?;
        self.ticket(Request::RegisterPushToken(register))
    }
}

impl Drop for PalaverClient {
    fn drop(&mut self) {
        let _ = self.command(Command::Close);
    }
}
