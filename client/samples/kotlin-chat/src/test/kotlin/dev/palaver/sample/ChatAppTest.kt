package dev.palaver.sample

import dev.palaver.client.ConnectionState
import dev.palaver.client.TokenProvider
import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.concurrent.TimeUnit
import org.junit.jupiter.api.AfterEach
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance

/**
 * The sample app against both backends: a real palaver-gateway process
 * (embedded engine) and `palaver cluster` (Kafka, Redis, a router, two
 * gateways), started here from the cargo target directory; tokens minted
 * with the `palaver` CLI.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class ChatAppTest {
    private val target = File(System.getProperty("palaver.target") ?: "../../../target/debug")
    private val dirs = mutableListOf<File>()
    private var gateway: Process? = null

    @BeforeAll
    fun init() = ChatApp.init()

    @AfterEach
    fun cleanUp() {
        gateway?.let { it.destroyForcibly(); it.waitFor(10, TimeUnit.SECONDS) }
        dirs.forEach { it.deleteRecursively() }
    }

    private fun tempDir(name: String) = Files.createTempDirectory(name).toFile().also { dirs.add(it) }

    /** Starts palaver-gateway on `port` with `dataDir`; waits until it accepts. */
    private fun startGateway(port: Int, dataDir: File, vararg extra: String) {
        val log = File(dataDir, "gateway.log")
        val p = ProcessBuilder(
            listOf(File(target, "palaver-gateway").path, "--listen", "127.0.0.1:$port", "--data-dir", dataDir.path, "--cores", "1") + extra,
        ).redirectErrorStream(true).redirectOutput(ProcessBuilder.Redirect.appendTo(log)).start()
        gateway = p
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30)
        while (true) {
            check(p.isAlive) { "gateway exited: " + log.readText() }
            val up = File(dataDir, "ca.pem").exists() && runCatching {
                Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 200) }
            }.isSuccess
            if (up) return
            check(System.nanoTime() < deadline) { "gateway did not start" }
            Thread.sleep(20)
        }
    }

    private fun tokens(user: String, dataDir: File) = object : TokenProvider {
        override fun fetchToken(forceRefresh: Boolean): String {
            val p = ProcessBuilder(File(target, "palaver").path, "token", "--user", user, "--data-dir", dataDir.path).start()
            val out = p.inputStream.bufferedReader().readText().trim()
            check(p.waitFor() == 0) { p.errorStream.bufferedReader().readText() }
            return out
        }
    }

    private fun app(user: String, port: Int, dataDir: File) = ChatApp(
        "127.0.0.1:$port", File(dataDir, "ca.pem").readText(), "phone", tokens(user, dataDir), tempDir("kotlin-chat-$user"),
    )

    @Test
    fun `two users chat through the durable single-node gateway`() {
        val port = ServerSocket(0).use { it.localPort }
        val data = tempDir("kotlin-chat-gw")
        startGateway(port, data)
        val started = System.nanoTime()
        app("alice", port, data).use { alice ->
            app("bob", port, data).use { bob ->
                alice.connect(); bob.connect()
                alice.send("alice", "bob", "hello bob")
                bob.await("the first message") { it.inbox.isNotEmpty() }
                println("sample: first message received ${(System.nanoTime() - started) / 1_000_000} ms after the apps started")
                assertEquals(Line("dm:alice:bob", 1, "alice", "hello bob"), bob.inbox.first())
                bob.send("bob", "alice", "hi alice")
                alice.await("the answer") { it.inbox.isNotEmpty() }
                assertEquals("hi alice", alice.inbox.first().text)
            }
        }
    }

    /** Runs the `palaver` CLI; fails the test with its output if it fails. */
    private fun palaver(vararg args: String) {
        val p = ProcessBuilder(listOf(File(target, "palaver").path) + args).redirectErrorStream(true).start()
        val out = p.inputStream.bufferedReader().readText()
        check(p.waitFor() == 0) { "palaver ${args.joinToString(" ")}: $out" }
    }

    @Test
    fun `two users chat through palaver cluster (Kafka, Redis, a router, two gateways)`() {
        val port = ServerSocket(0).use { it.localPort }
        val data = tempDir("kotlin-chat-cluster-certs")
        val state = tempDir("kotlin-chat-cluster")
        // The cluster backend without the Cassandra archive (its own tests
        // cover it): the same gateways, routers, Kafka and Redis.
        palaver("cluster", "up", "--dir", state.path, "--data-dir", data.path, "--listen", "127.0.0.1:$port", "--no-archive")
        try {
            app("alice", port, data).use { alice ->
                app("bob", port, data).use { bob ->
                    alice.connect(); bob.connect()
                    val texts = (0 until 200).map { "k%05d".format(it) }
                    texts.forEach { alice.send("alice", "bob", it) }
                    bob.await("200 messages through the cluster", 60) { it.inbox.size >= 200 }
                    assertEquals(texts, bob.inbox.map { it.text }, "exactly once, in order")
                    assertEquals((1L..200L).toList(), bob.inbox.map { it.seq })
                    bob.send("bob", "alice", "got them")
                    alice.await("the answer", 60) { it.inbox.isNotEmpty() }
                    assertEquals("got them", alice.inbox.first().text)
                }
            }
        } finally {
            palaver("cluster", "down", "--dir", state.path)
        }
    }

    @Test
    fun `a memory-only gateway restarted under traffic loses nothing it stores`() {
        val port = ServerSocket(0).use { it.localPort }
        val data = tempDir("kotlin-chat-gw")
        startGateway(port, data, "--ephemeral")
        val alice = app("alice", port, data)
        val bob = app("bob", port, data)
        alice.connect(); bob.connect()
        (0 until 300).forEach { alice.send("alice", "bob", "a%05d".format(it)) }
        bob.await("the first 300") { it.inbox.size >= 300 }
        alice.await("300 acks") { it.acked.size >= 300 }
        val during = (0 until 300).map { "b%05d".format(it) }
        during.forEach { alice.send("alice", "bob", it) }
        bob.await("some of the next") { it.inbox.size >= 310 }
        gateway!!.destroyForcibly().waitFor(10, TimeUnit.SECONDS)
        // Events reach the app in order: once both saw the link go, they
        // have seen everything the old server sent them.
        listOf(alice, bob).forEach { a -> a.await("the link lost") { it.state is ConnectionState.Connecting } }
        val ackedByOld = alice.acked.toSet()
        val gotFromOld = bob.inbox.map { it.text }.toSet()
        startGateway(port, data, "--ephemeral")
        val after = (0 until 300).map { "c%05d".format(it) }
        after.forEach { alice.send("alice", "bob", it) }

        val storedByNew = (during + after).filter { it !in ackedByOld }
        val forgotten = during.count { it in ackedByOld && it !in gotFromOld }
        bob.await("every message the new server stores", 60) { b ->
            val got = b.inbox.map { it.text }.toSet()
            storedByNew.all { it in got }
        }
        val got = bob.inbox.map { it.text }.filter { it in storedByNew.toSet() }
        println("sample restart: ${storedByNew.size} stored by the new server, ${got.size} received, $forgotten acknowledged by the old one and forgotten with it")
        assertEquals(storedByNew, got, "exactly once, in order")
        assertTrue(bob.inbox.any { it.text in storedByNew.toSet() && it.seq <= 300 }, "seqs below the old cursor came through")
        assertTrue(bob.resets.contains("dm:alice:bob"), "bob's app was told")
        alice.close(); bob.close()
    }
}
