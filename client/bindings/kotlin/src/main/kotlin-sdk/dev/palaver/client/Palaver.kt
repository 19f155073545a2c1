package dev.palaver.client

import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.filterIsInstance
import kotlinx.coroutines.flow.map
import kotlinx.coroutines.flow.receiveAsFlow

/** A conversation id (`dm:<a>:<b>` or `grp:<id>`): compared by value. */
@JvmInline
value class ConversationId(val value: String) {
    override fun toString() = value

    companion object {
        /** The direct conversation of two users (SPEC §11). */
        fun direct(userA: String, userB: String) = ConversationId(directConversationId(userA, userB))
    }
}

/** A message's client id, as lowercase hex: compared by value (a `ByteArray` is not). */
@JvmInline
value class ClientMsgId(val hex: String) {
    override fun toString() = hex

    companion object {
        fun of(bytes: ByteArray) = ClientMsgId(bytes.joinToString("") { "%02x".format(it) })
    }
}

/** What the server said when it stored a message. */
data class Sent(
    val id: ClientMsgId,
    val conversation: ConversationId,
    val seq: ULong,
    val messageId: String,
    val serverTimeMs: Long,
)

/** One page of history, ascending by seq. */
data class History(val conversation: ConversationId, val messages: List<ChatMessage>, val hasMore: Boolean)

/** A page of a conversation's members ([Palaver.members]); ask again after the last one while [hasMore]. */
data class MemberPage(val members: List<Member>, val hasMore: Boolean, val memberCount: UInt)

/** The server refused a message or a request for good (a 2xxx code, SPEC §14). */
class RefusedException(val error: ServerError?, message: String) : Exception(message)

/**
 * The SDK for Kotlin code: the connection state as a [StateFlow], what
 * arrives as [Flow]s, and `suspend` calls that return the server's answer.
 * Written by hand over the generated [PalaverClient] (same guarantees,
 * client/SDK-SPEC.md); construct it with [Palaver.connect].
 *
 * - [state] always holds the latest state.
 * - [events] is every [ClientEvent] in order, and [messages] the chat
 *   messages among them. Both read ONE buffer that keeps everything until
 *   it is collected (nothing is lost while no one collects), so collect
 *   exactly one of them, once (e.g. in a repository that stores messages),
 *   and share from there. Note the SDK saves its cursor once a message is
 *   in that buffer: store messages as you collect them.
 * - A `suspend` call that is cancelled leaves its request alone: a message
 *   stays in the outbox and is still sent.
 */
class Palaver private constructor(
    config: ClientConfig,
    tokens: TokenProvider,
    store: ClientStore?,
) : AutoCloseable {
    private val _state = MutableStateFlow<ConnectionState>(ConnectionState.Disconnected(null))
    val state: StateFlow<ConnectionState> = _state.asStateFlow()

    private val buffer = Channel<ClientEvent>(Channel.UNLIMITED)
    val events: Flow<ClientEvent> = buffer.receiveAsFlow()
    val messages: Flow<ChatMessage> = events.filterIsInstance<ClientEvent.Message>().map { it.message }

    /** Answers by ticket or client id. */
    private val waiting = HashMap<String, CompletableDeferred<ClientEvent>>()

    /**
     * Answers nobody waits for yet: one may come between the call returning
     * its id and the waiter registering. Bounded (the newest few): answers
     * nobody will ever wait for (a message an earlier run left in the
     * outbox) fall out.
     */
    private val early = object : LinkedHashMap<String, ClientEvent>() {
        override fun removeEldestEntry(eldest: MutableMap.MutableEntry<String, ClientEvent>) = size > EARLY_ANSWERS
    }

    private val listener = object : EventListener {
        override fun onEvent(event: ClientEvent) {
            if (event is ClientEvent.StateChanged) _state.value = event.state
            answerKey(event)?.let { key ->
                synchronized(waiting) {
                    val waiter = waiting.remove(key)
                    if (waiter != null) waiter.complete(event) else early[key] = event
                }
            }
            buffer.trySend(event)
        }
    }

    private val client: PalaverClient

    init {
        PalaverThreads.attach()
        client = PalaverClient(config, tokens, listener, store)
    }

    /**
     * Sends text; returns once the server stored it (throws [RefusedException] if it refuses).
     * In a channel, `mentions` (at most 20 members) are pushed when they are offline.
     */
    suspend fun sendText(conversation: ConversationId, text: String, mentions: List<String> = emptyList()): Sent {
        val raw = if (mentions.isEmpty()) {
            client.sendText(conversation.value, text)
        } else {
            client.sendMentioning(conversation.value, ContentKind.TEXT, text.toByteArray(), 0uL, null, mentions)
        }
        val id = ClientMsgId.of(raw)
        return when (val e = await("m:${id.hex}")) {
            is ClientEvent.MessageSent -> Sent(id, conversation, e.seq, e.messageId, e.serverTimeMs)
            is ClientEvent.SendFailed -> throw RefusedException(e.error, "not sent: ${e.error.message}")
            else -> error("unexpected answer $e")
        }
    }

    /** The newest `limit` messages before `beforeSeq` (0: from the newest). */
    suspend fun history(conversation: ConversationId, beforeSeq: ULong = 0u, limit: UInt = 50u): History =
        when (val e = await("t:${client.loadHistory(conversation.value, beforeSeq, limit)}")) {
            is ClientEvent.HistoryPage -> History(conversation, e.messages, e.hasMore)
            else -> throw refused(e)
        }

    /** Creates a group with the caller as admin. */
    suspend fun createGroup(title: String, members: List<String>): Conversation =
        conversation(await("t:${client.createGroup(title, members)}"))

    /** The direct conversation with `peer`, created if new. */
    suspend fun openDirect(peer: String): Conversation = conversation(await("t:${client.openDirect(peer)}"))

    /** Creates a channel (SPEC §21) with the caller as admin. */
    suspend fun createChannel(
        title: String,
        members: List<String>,
        public: Boolean = false,
        adminsOnlyPost: Boolean = false,
    ): Conversation = conversation(await("t:${client.createChannel(title, members, ChannelSettings(public, adminsOnlyPost))}"))

    /** A page of members ascending by user id, after `afterUserId` (null: from the start). */
    suspend fun members(conversation: ConversationId, afterUserId: String? = null, limit: UInt = 100u): MemberPage =
        when (val e = await("t:${client.listMembers(conversation.value, afterUserId, limit)}")) {
            is ClientEvent.MemberPage -> MemberPage(e.members, e.hasMore, e.memberCount)
            else -> throw refused(e)
        }

    /**
     * What this client receives of a channel: [ChannelMode.LIVE] while it is on
     * screen, [ChannelMode.COUNTS] in a list ([channelActivity]), [ChannelMode.CLOSED]
     * for nothing live. Kept across reconnects until changed.
     */
    fun openChannel(conversation: ConversationId, mode: ChannelMode) = client.openChannel(conversation.value, mode)

    /** Channels open in COUNTS mode that moved: (channel, its newest seq), batched by the server. */
    val channelActivity: Flow<Pair<ConversationId, ULong>> =
        events.filterIsInstance<ClientEvent.ChannelActivity>().map { ConversationId(it.conversationId) to it.lastSeq }

    fun connect() = client.connect()
    fun disconnect() = client.disconnect()
    fun reconnectNow() = client.reconnectNow()
    fun markRead(conversation: ConversationId, upToSeq: ULong) = client.markRead(conversation.value, upToSeq)
    fun setTyping(conversation: ConversationId, active: Boolean) = client.setTyping(conversation.value, active)

    /** Shuts the client down (returns at once) and ends [events]. */
    override fun close() {
        client.shutdown()
        buffer.close()
        synchronized(waiting) {
            waiting.values.forEach { it.cancel() }
            waiting.clear()
        }
    }

    private suspend fun await(key: String): ClientEvent {
        val waiter = synchronized(waiting) {
            early.remove(key)?.let { return it }
            CompletableDeferred<ClientEvent>().also { waiting[key] = it }
        }
        try {
            return waiter.await()
        } finally {
            synchronized(waiting) { waiting.remove(key) }
        }
    }

    private fun conversation(e: ClientEvent): Conversation = when (e) {
        is ClientEvent.ConversationResult -> e.conversation
        else -> throw refused(e)
    }

    private fun refused(e: ClientEvent): Exception = when (e) {
        is ClientEvent.RequestFailed -> RefusedException(
            e.error,
            e.error?.let { "refused: ${it.message}" } ?: "the connection dropped before the answer",
        )
        else -> IllegalStateException("unexpected answer $e")
    }

    companion object {
        private const val EARLY_ANSWERS = 1024

        /** A client that starts connecting at once. */
        fun connect(config: ClientConfig, tokens: TokenProvider, store: ClientStore? = null): Palaver =
            Palaver(config, tokens, store).also { it.connect() }

        private fun answerKey(e: ClientEvent): String? = when (e) {
            is ClientEvent.MessageSent -> "m:${ClientMsgId.of(e.clientMsgId).hex}"
            is ClientEvent.SendFailed -> "m:${ClientMsgId.of(e.clientMsgId).hex}"
            is ClientEvent.HistoryPage -> "t:${e.ticket}"
            is ClientEvent.ConversationResult -> "t:${e.ticket}"
            is ClientEvent.MemberPage -> "t:${e.ticket}"
            is ClientEvent.RequestFailed -> "t:${e.ticket}"
            else -> null
        }
    }
}
