package dev.palaver.sample

import dev.palaver.client.ClientConfig
import dev.palaver.client.ClientEvent
import dev.palaver.client.ClientStore
import dev.palaver.client.ConnectionState
import dev.palaver.client.ContentKind
import dev.palaver.client.EventListener
import dev.palaver.client.LogLevel
import dev.palaver.client.LogSink
import dev.palaver.client.OutgoingMessage
import dev.palaver.client.PalaverClient
import dev.palaver.client.PalaverThreads
import dev.palaver.client.SyncCursor
import dev.palaver.client.TokenProvider
import dev.palaver.client.directConversationId
import dev.palaver.client.palaverClient
import dev.palaver.client.setLogSink
import java.io.File
import java.util.Base64
import java.util.concurrent.CopyOnWriteArrayList

/** A message as this app shows it. */
data class Line(val conversation: String, val seq: Long, val from: String, val text: String)

/**
 * The app's persistence for the SDK: the outbox and the sync cursors in two
 * small files (an Android app would use Room or SQLite). Text messages
 * only: the sample sends no media.
 */
class FileStore(private val dir: File) : ClientStore {
    private val outboxFile = File(dir, "outbox.tsv")
    private val cursorsFile = File(dir, "cursors.tsv")
    private val b64 = Base64.getEncoder()
    private val unb64 = Base64.getDecoder()

    init {
        dir.mkdirs()
    }

    @Synchronized
    override fun loadOutbox(): List<OutgoingMessage> = lines(outboxFile).map { l ->
        val f = l.split('\t')
        OutgoingMessage(
            clientMsgId = unb64.decode(f[0]),
            conversationId = f[1],
            kind = ContentKind.TEXT,
            body = unb64.decode(f[2]),
            replyToSeq = f[3].toULong(),
            media = null,
            createdOrder = f[4].toULong(),
            // Lines written before mentions were kept have 5 fields.
            mentionUserIds = f.getOrNull(5)?.split(',')?.filter { it.isNotEmpty() } ?: emptyList(),
        )
    }

    @Synchronized
    override fun saveOutgoing(message: OutgoingMessage) {
        outboxFile.appendText(
            listOf(
                b64.encodeToString(message.clientMsgId), message.conversationId,
                b64.encodeToString(message.body), message.replyToSeq, message.createdOrder,
                // User ids have no commas (SPEC §11).
                message.mentionUserIds.joinToString(","),
            ).joinToString("\t") + "\n",
        )
    }

    @Synchronized
    override fun removeOutgoing(clientMsgId: ByteArray) {
        val id = b64.encodeToString(clientMsgId)
        rewrite(outboxFile, lines(outboxFile).filter { !it.startsWith("$id\t") })
    }

    @Synchronized
    override fun loadCursors(): List<SyncCursor> = lines(cursorsFile).map { l ->
        val f = l.split('\t')
        SyncCursor(conversationId = f[0], afterSeq = f[1].toULong(), historyEpoch = f[2].toULong())
    }

    @Synchronized
    override fun saveCursor(cursor: SyncCursor) {
        val others = lines(cursorsFile).filter { !it.startsWith("${cursor.conversationId}\t") }
        rewrite(cursorsFile, others + "${cursor.conversationId}\t${cursor.afterSeq}\t${cursor.historyEpoch}")
    }

    private fun lines(f: File) = if (f.exists()) f.readLines().filter { it.isNotBlank() } else emptyList()

    private fun rewrite(f: File, lines: List<String>) {
        val tmp = File(dir, f.name + ".tmp")
        tmp.writeText(lines.joinToString("") { "$it\n" })
        tmp.renameTo(f)
    }
}

/**
 * One signed-in user on one device: connects, keeps what arrives, sends
 * text. Everything the SDK reports comes through [onEvent] on the SDK's
 * `palaver-events` thread.
 */
class ChatApp(
    address: String,
    trustedCaPem: String,
    val deviceId: String,
    tokens: TokenProvider,
    storeDir: File,
) : EventListener, AutoCloseable {
    val inbox = CopyOnWriteArrayList<Line>()
    /** Texts the server acknowledged (stored), in the order it did. */
    val acked = CopyOnWriteArrayList<String>()
    /** Sent, not yet acknowledged: client id (hex) → text. */
    private val unacked = HashMap<String, String>()
    /** Acknowledged before `send` had noted the id (the ack can win that race). */
    private val ackedFirst = HashSet<String>()
    val resets = CopyOnWriteArrayList<String>()
    @Volatile var state: ConnectionState = ConnectionState.Disconnected(null)
        private set
    private val lock = Object()
    private val client: PalaverClient = palaverClient(
        ClientConfig(
            address = address,
            serverName = "localhost",
            trustedCaPem = trustedCaPem,
            deviceId = deviceId,
            clientName = "kotlin-chat-sample",
            backoffBaseMs = 50u,
            backoffMaxMs = 1_000u,
        ),
        tokens,
        this,
        FileStore(storeDir),
    )

    fun connect() = client.connect()

    /** Sends `text` to `peer` in their direct conversation. */
    fun send(me: String, peer: String, text: String) {
        // Stored in the outbox before it returns; resent until acknowledged.
        val id = hex(client.sendText(directConversationId(me, peer), text))
        synchronized(unacked) {
            if (ackedFirst.remove(id)) acked.add(text) else unacked[id] = text
        }
    }

    private fun hex(id: ByteArray) = id.joinToString("") { "%02x".format(it) }

    override fun onEvent(event: ClientEvent) {
        when (event) {
            is ClientEvent.StateChanged -> state = event.state
            is ClientEvent.Message -> inbox.add(
                Line(event.message.conversationId, event.message.seq.toLong(), event.message.senderUserId, String(event.message.body)),
            )
            is ClientEvent.MessageSent -> {
                val id = hex(event.clientMsgId)
                synchronized(unacked) {
                    val text = unacked.remove(id)
                    if (text != null) acked.add(text) else ackedFirst.add(id)
                }
            }
            // The server lost its history: seqs start again; this app keys
            // nothing by seq, so it only notes it.
            is ClientEvent.HistoryReset -> resets.add(event.conversationId)
            else -> Unit
        }
        synchronized(lock) { lock.notifyAll() }
    }

    /** Waits (up to `seconds`) until `cond` holds. */
    fun await(what: String, seconds: Long = 30, cond: (ChatApp) -> Boolean) {
        val deadline = System.nanoTime() + seconds * 1_000_000_000
        synchronized(lock) {
            while (!cond(this)) {
                val left = (deadline - System.nanoTime()) / 1_000_000
                check(left > 0) { "timed out waiting for $what (state $state, ${inbox.size} received)" }
                lock.wait(left)
            }
        }
    }

    override fun close() = client.shutdown()

    companion object {
        /** What an app does once at start. */
        fun init() {
            PalaverThreads.attach()
            setLogSink(object : LogSink {
                override fun log(level: LogLevel, message: String) {
                    if (level >= LogLevel.INFO) System.err.println("palaver $level: $message")
                }
            })
        }
    }
}

/**
 * A console chat: `kotlin-chat <address> <ca.pem> <user> <peer> <token>`,
 * then each line typed is sent to the peer; what arrives is printed.
 */
fun main(args: Array<String>) {
    require(args.size == 5) { "usage: kotlin-chat <address> <ca.pem> <user> <peer> <token>" }
    val (address, ca, user, peer, token) = args
    ChatApp.init()
    val tokens = object : TokenProvider {
        override fun fetchToken(forceRefresh: Boolean) = token
    }
    val app = ChatApp(address, File(ca).readText(), "console", tokens, File(System.getProperty("user.home"), ".kotlin-chat/$user"))
    app.connect()
    var shown = 0
    generateSequence(::readLine).forEach { line ->
        if (line.isNotBlank()) app.send(user, peer, line)
        app.inbox.drop(shown).forEach { println("${it.from}: ${it.text}") }
        shown = app.inbox.size
    }
    app.close()
}
