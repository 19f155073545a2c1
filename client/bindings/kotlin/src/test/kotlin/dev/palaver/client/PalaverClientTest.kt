package dev.palaver.client

import java.io.File
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
    private lateinit var gw: TestGateway
    private val target get() = gw.target
    private val port get() = gw.port
    private val caPem get() = gw.caPem

    @BeforeAll
    fun startGateway() {
        // What an app does first thing (Application.onCreate).
        PalaverThreads.attach()
        gw = TestGateway()
    }

    @AfterAll
    fun stopGateway() = gw.close()

    private fun mint(user: String) = gw.mint(user)

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

    private fun client(user: String, recorder: EventListener, store: ClientStore? = null, tokens: Tokens = Tokens { mint(user) }) =
        palaverClient(
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
        // The SDK empties the outbox entry before it reports MessageSent.
        rd.await("the probe's ack") { ev -> ev.count { it is ClientEvent.MessageSent } == 3 }
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
    fun `push token and mute through the gateway`() {
        val r = Recorder()
        val c = client("hana", r)
        c.connect(); r.awaitConnected()
        val registered = c.registerFcmToken("fcm:kotlin-token", "de-CH")
        r.await("PushTokenRegistered") { ev ->
            ev.any { it is ClientEvent.PushTokenRegistered && it.ticket == registered }
        }
        val conv = directConversationId("hana", "ivan")
        val muted = c.muteConversation(conv, null)
        r.await("MuteChanged") { ev ->
            ev.any { it is ClientEvent.MuteChanged && it.ticket == muted && it.forever && it.conversationId == conv }
        }
        val gone = c.unregisterPushToken()
        r.await("PushTokenUnregistered") { ev ->
            ev.any { it is ClientEvent.PushTokenUnregistered && it.ticket == gone && it.wasRegistered }
        }
        assertThrows<ClientException.InvalidArgument> {
            c.registerApnsToken(ByteArray(32), false, "", null)
        }
        c.shutdown()
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

    class Lines : LogSink {
        val lines = CopyOnWriteArrayList<Pair<LogLevel, String>>()
        override fun log(level: LogLevel, message: String) {
            lines.add(level to message)
        }
    }

    @Test
    fun `every callback runs on one palaver-events thread and a throwing listener is logged, not fatal`() {
        val sink = Lines()
        setLogSink(sink)
        val threads = CopyOnWriteArrayList<Thread>()
        val inner = Recorder()
        val throwing = object : EventListener {
            override fun onEvent(event: ClientEvent) {
                threads.add(Thread.currentThread())
                inner.onEvent(event)
                if (event is ClientEvent.Message) throw IllegalStateException("app bug in onEvent")
            }
        }
        val ra = Recorder()
        val kim = client("kim", ra)
        val lee = client("lee", throwing)
        kim.connect(); lee.connect()
        ra.awaitConnected(); inner.awaitConnected()
        val conv = directConversationId("kim", "lee")
        repeat(20) { kim.sendText(conv, "m$it") }
        inner.await("20 messages, each one thrown at") { inner.messages(conv).size >= 20 }
        assertEquals((0 until 20).map { "m$it" }, inner.messages(conv).map { String(it.body) })
        val distinct = threads.toSet()
        assertEquals(1, distinct.size, "one thread for every callback: ${distinct.map { it.name }}")
        assertEquals("palaver-events", distinct.first().name)
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20)
        while (sink.lines.count { it.second.contains("app bug in onEvent") } < 20) {
            check(System.nanoTime() < deadline) { "log lines: ${sink.lines}" }
            Thread.sleep(10)
        }
        assertTrue(sink.lines.filter { it.second.contains("app bug in onEvent") }.all { it.first == LogLevel.ERROR })
        clearLogSink()
        kim.shutdown(); lee.shutdown()
    }

    @Test
    fun `shutdown returns while the token provider is still stuck in a fetch, and no event follows`() {
        val entered = java.util.concurrent.CountDownLatch(1)
        val release = java.util.concurrent.CountDownLatch(1)
        val stuck = object : TokenProvider {
            override fun fetchToken(forceRefresh: Boolean): String {
                entered.countDown()
                release.await(60, TimeUnit.SECONDS) // a slow auth service
                return mint("stuck")
            }
        }
        val r = Recorder()
        val c = palaverClient(
            ClientConfig(address = "127.0.0.1:$port", serverName = "localhost", trustedCaPem = caPem, deviceId = "jvm"),
            stuck, r, null,
        )
        c.connect()
        assertTrue(entered.await(20, TimeUnit.SECONDS), "the fetch started")
        val started = System.nanoTime()
        c.shutdown()
        val tookMs = (System.nanoTime() - started) / 1_000_000
        // Returned although the provider has not: it is still blocked.
        assertEquals(1L, release.count, "shutdown did not wait for the provider")
        println("shutdown while fetching a token returned in $tookMs ms")
        val before = r.events.size
        release.countDown()
        assertTrue(c.state() is ConnectionState.Closed)
        // The fetch that completes now is not used, and the app hears
        // nothing: another client's full connect gives the stuck one's I/O
        // thread ample turns to misbehave, without a bare sleep.
        val other = Recorder()
        val probe = client("probe", other)
        probe.connect(); other.awaitConnected(); probe.shutdown()
        assertEquals(before, r.events.size, "no event after shutdown: ${r.events.drop(before)}")
    }

    @Test
    fun `an untrusted server certificate stops reconnecting with the reason`() {
        // Some other CA, not the gateway's.
        val otherCa = Files.createTempDirectory("palaver-other-ca").toFile()
        val p = ProcessBuilder(
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=not the gateway's CA", "-days", "1",
            "-keyout", File(otherCa, "key.pem").path, "-out", File(otherCa, "ca.pem").path,
        ).redirectErrorStream(true).start()
        check(p.waitFor() == 0) { p.inputStream.bufferedReader().readText() }
        val wrongCa = File(otherCa, "ca.pem").readText()
        val r = Recorder()
        val c = palaverClient(
            ClientConfig(address = "127.0.0.1:$port", serverName = "localhost", trustedCaPem = wrongCa, deviceId = "jvm"),
            Tokens { mint("wrongca") }, r, null,
        )
        c.connect()
        r.await("a stop with the reason") { ev ->
            ev.any {
                it is ClientEvent.StateChanged && (it.state as? ConnectionState.Disconnected)?.cause.let { cause ->
                    cause is DisconnectCause.Failed && cause.failure is ConnectFailure.UntrustedCertificate
                }
            }
        }
        c.shutdown()
        otherCa.deleteRecursively()
    }
}
