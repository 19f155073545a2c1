// The "With coroutines" snippet of client/bindings/kotlin/README.md,
// verbatim (ReadmeSnippetsTest checks it), and what it assumes of the app.
package dev.palaver.sample.readme

import dev.palaver.client.*
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.launch

suspend fun chatWithPete(config: ClientConfig, auth: AuthService, repository: Repository, scope: CoroutineScope) {
    val chat = Palaver.connect(config, Tokens(auth))               // starts connecting
    chat.state.first { it is ConnectionState.Connected }
    val dm = ConversationId.direct("olga", "pete")
    val sent: Sent = chat.sendText(dm, "m1")                        // suspends until stored: sent.seq
    scope.launch { chat.messages.collect { repository.store(it) } } // collect once; buffered until then
    val page = chat.history(dm, beforeSeq = 0u, limit = 3u)         // RefusedException if refused
    println("stored as #${sent.seq}; ${page.messages.size} in the page")
    chat.close()
}

// What the snippet assumes the app has.
interface Repository {
    fun store(message: ChatMessage)
}
