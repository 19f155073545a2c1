package dev.palaver.client

import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance
import org.junit.jupiter.api.assertThrows

/**
 * The Kotlin bindings against a real palaver-gateway process (embedded
 * engine, dev certificates in a temporary directory), started here from the
 * cargo target directory. Tokens come from the `palaver token` CLI.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class PalaverClientTest {
    private val target = File(System.getProperty("palaver.target") ?: "../../../target/debug")
    private lateinit var dataDir: File
    private lateinit var gateway: Process
    private var port = 0
    private lateinit var caPem: String

    @BeforeAll
    fun startGateway() {
        dataDir = Files.createTempDirectory("palaver-kotlin-test").toFile()
        port = ServerSocket(0).use { it.localPort }
        gateway = ProcessBuilder(
            File(target, "palaver-gateway").path,
            "--listen", "127.0.0.1:$port",
            "--data-dir", dataDir.path,
            "--cores", "1",
        ).redirectErrorStream(true)
            .redirectOutput(File(dataDir, "gateway.log"))
            .start()
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30)
        while (true) {
            check(gateway.isAlive) { "gateway exited: " + File(dataDir, "gateway.log").readText() }
            val up = File(dataDir, "ca.pem").exists() && runCatching {
                Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 200) }
            }.isSuccess
            if (up) break
            check(System.nanoTime() < deadline) { "gateway did not start" }
            Thread.sleep(50)
        }
        caPem = File(dataDir, "ca.pem").readText()
    }

    @AfterAll
    fun stopGateway() {
        gateway.destroy()
        gateway.waitFor(10, TimeUnit.SECONDS)
        dataDir.deleteRecursively()
    }

    /** Mints a dev token with the CLI (the gateway's dev secret). */
    private fun mint(user: String): String {
        val p = ProcessBuilder(
            File(target, "palaver").path, "token", "--user", user, "--data-dir", dataDir.path,
        ).start()
        val out = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor() == 0) { p.errorStream.bufferedReader().readText() }
        return out
    }

    /** Records events; tests await conditions with a deadline. */
    class Recorder : EventListener {
        val events = CopyOnWriteArrayList<ClientEvent>()
        private val lock = Object()

        override fun onEvent(event: ClientEvent) {
            events.add(event)
            synchronized(lock) { lock.notifyAll() }
        }

        fun await(what: String, cond: (List<ClientEvent>) -> Boolean) {
            val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20)
            synchronized(lock) {
                while (!cond(events)) {
                    val left = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime())
                    check(left > 0) { "timed out waiting for $what; events: $events" }
                    lock.wait(left)
                }
            }
        }

        fun messages(conversation: String) = events
            .filterIsInstance<ClientEvent.Message>()
            .map { it.message }
            .filter { it.conversationId == conversation }

        fun awaitConnected() = await("connected") { ev ->
            ev.any { it is ClientEvent.StateChanged && it.state is ConnectionState.Connected }
        }
    }

    class Tokens(private val mint: () -> String) : TokenProvider {
        val calls = AtomicInteger()
        override fun fetchToken(forceRefresh: Boolean): String {
            calls.incrementAndGet()
            return mint()
        }
    }

    private fun client(user: String, recorder: Recorder, store: ClientStore? = null, tokens: Tokens = Tokens { mint(user) }) =
        PalaverClient(
            ClientConfig(
                address = "127.0.0.1:$port",
                serverName = "localhost",
                trustedCaPem = caPem,
                deviceId = "jvm",
                clientName = "kotlin-test",
                backoffBaseMs = 50u,
            ),
            tokens,
            recorder,
            store,
        )

    @Test
    fun `two clients send and receive`() {
        val ra = Recorder()
        val rb = Recorder()
        val alice = client("alice", ra)
        val bob = client("bob", rb)
        alice.connect(); bob.connect()
        ra.awaitConnected(); rb.awaitConnected()
        val conv = directConversationId("alice", "bob")
        val id = alice.sendText(conv, "hello from kotlin")
        rb.await("the message") { rb.messages(conv).isNotEmpty() }
        val m = rb.messages(conv).first()
        assertEquals("hello from kotlin", String(m.body))
        assertEquals("alice", m.senderUserId)
        assertTrue(id.contentEquals(m.clientMsgId))
        ra.await("MessageSent") { ev -> ev.any { it is ClientEvent.MessageSent && it.clientMsgId.contentEquals(id) } }
        alice.shutdown(); bob.shutdown()
    }

    @Test
    fun `sent while disconnected is delivered once after connect`() {
        val rb = Recorder()
        val carol = client("carol", rb)
        carol.connect(); rb.awaitConnected()
        val rd = Recorder()
        val store = memoryStore()
        val dave = client("dave", rd, store)
        val conv = directConversationId("carol", "dave")
        dave.sendText(conv, "one")
        dave.sendText(conv, "two")
        assertEquals(2, store.loadOutbox().size, "stored before sendText returned")
        dave.connect()
        rb.await("two messages") { rb.messages(conv).size >= 2 }
        // A probe behind them: a duplicate would have arrived before it.
        rd.await("two acks") { ev -> ev.count { it is ClientEvent.MessageSent } == 2 }
        dave.sendText(conv, "probe")
        rb.await("the probe") { rb.messages(conv).size >= 3 }
        assertEquals(listOf("one", "two", "probe"), rb.messages(conv).map { String(it.body) })
        assertEquals(listOf(1uL, 2uL, 3uL), rb.messages(conv).map { it.seq })
        assertTrue(store.loadOutbox().isEmpty())
        dave.shutdown(); carol.shutdown()
    }

    @Test
    fun `event listener sees states in order and may call back into the client`() {
        val tokens = Tokens { mint("erin") }
        val echoed = AtomicInteger()
        lateinit var erin: PalaverClient
        val recorder = object : EventListener {
            val states = CopyOnWriteArrayList<ConnectionState>()
            val inner = Recorder()
            override fun onEvent(event: ClientEvent) {
                if (event is ClientEvent.StateChanged) {
                    states.add(event.state)
                    // Calling the client from the listener is allowed.
                    if (event.state is ConnectionState.Connected && echoed.getAndIncrement() == 0) {
                        erin.sendText(directConversationId("erin", "frank"), "sent from the callback")
                    }
                }
                inner.onEvent(event)
            }
        }
        erin = PalaverClient(
            ClientConfig(address = "127.0.0.1:$port", serverName = "localhost", trustedCaPem = caPem, deviceId = "jvm"),
            tokens,
            recorder,
            null,
        )
        assertTrue(erin.state() is ConnectionState.Disconnected)
        erin.connect()
        recorder.inner.await("MessageSent from the callback") { ev -> ev.any { it is ClientEvent.MessageSent } }
        assertTrue(recorder.states[0] is ConnectionState.Connecting, "${recorder.states}")
        assertTrue(recorder.states[1] is ConnectionState.Connected, "${recorder.states}")
        assertEquals("erin", (recorder.states[1] as ConnectionState.Connected).userId)
        assertTrue(tokens.calls.get() >= 1)
        erin.disconnect()
        recorder.inner.await("disconnected") { ev ->
            ev.any { it is ClientEvent.StateChanged && it.state is ConnectionState.Disconnected }
        }
        erin.shutdown()
    }

    @Test
    fun `invalid arguments are typed errors`() {
        val r = Recorder()
        val c = client("gina", r)
        val e = assertThrows<ClientException.InvalidArgument> { c.sendText("not-a-conversation", "x") }
        assertTrue(e.message!!.contains("not a conversation id"), e.message)
        assertThrows<ClientException.InvalidArgument> { directConversationId("a", "a") }
        assertThrows<ClientException.Config> {
            PalaverClient(ClientConfig(address = "x:1", trustedCaPem = "", deviceId = "jvm"), Tokens { "" }, r, null)
        }
        c.shutdown()
    }
}
