// The "Send and receive" snippet of client/bindings/kotlin/README.md,
// verbatim (ReadmeSnippetsTest checks it), and what it assumes of the app.
package dev.palaver.sample.readme

import dev.palaver.client.*

class Tokens(private val auth: AuthService) : TokenProvider {
    override fun fetchToken(forceRefresh: Boolean): String = try {
        auth.palaverToken(forceRefresh)
    } catch (e: SignedOutException) {
        throw TokenException.Denied("signed out")        // stop connecting
    }                                                   // other exceptions: retried with backoff
}

class ChatScreen(private val ui: ChatUi) : EventListener {
    override fun onEvent(event: ClientEvent) = when (event) {
        is ClientEvent.StateChanged -> ui.showState(event.state)  // Connecting(lastFailure) / Connected / ...
        is ClientEvent.Message -> ui.append(event.message.senderUserId, String(event.message.body))
        is ClientEvent.MessageSent -> ui.markSent(event.clientMsgId, event.seq)
        is ClientEvent.Receipt -> ui.markRead(event.userId, event.upToSeq)
        else -> Unit
    }
}

fun startChat(auth: AuthService, ui: ChatUi, caPem: String, installationId: String): PalaverClient {
    // First thing at app start, before any other SDK call: every callback
    // then runs on one `palaver-events` thread. Log lines go where you route them.
    PalaverThreads.attach()
    setLogSink(object : LogSink {
        override fun log(level: LogLevel, message: String) = println("palaver $level: $message")
    })
    val client = palaverClient(
        ClientConfig(address = "chat.example.com:7443", trustedCaPem = caPem, deviceId = installationId),
        Tokens(auth), ChatScreen(ui), store = null,      // or your ClientStore over Room/SQLite
    )
    client.connect()
    val conversation = directConversationId("alice", "bob")
    client.sendText(conversation, "hi")                  // stored in the outbox, resent until acked
    client.markRead(conversation, upToSeq = 1uL)
    return client
}

// What the snippet assumes the app has.
interface AuthService {
    fun palaverToken(fresh: Boolean): String
}

class SignedOutException : Exception()

interface ChatUi {
    fun showState(state: ConnectionState)
    fun append(from: String, text: String)
    fun markSent(id: ByteArray, seq: ULong)
    fun markRead(user: String, upToSeq: ULong)
}
