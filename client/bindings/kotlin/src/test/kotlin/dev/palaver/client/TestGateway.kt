package dev.palaver.client

import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.concurrent.TimeUnit

/**
 * A real palaver-gateway process for the JVM tests (embedded engine, dev
 * certificates in a temporary data dir), started from the cargo target
 * directory (`-Dpalaver.target`); tokens minted with the `palaver` CLI.
 */
class TestGateway : AutoCloseable {
    val target = File(System.getProperty("palaver.target") ?: "../../../target/debug")
    val dataDir: File = Files.createTempDirectory("palaver-kotlin-test").toFile()
    val port = ServerSocket(0).use { it.localPort }
    private val process: Process = ProcessBuilder(
        File(target, "palaver-gateway").path, "--listen", "127.0.0.1:$port", "--data-dir", dataDir.path, "--cores", "1",
    ).redirectErrorStream(true).redirectOutput(File(dataDir, "gateway.log")).start()
    val caPem: String

    init {
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30)
        while (true) {
            check(process.isAlive) { "gateway exited: " + File(dataDir, "gateway.log").readText() }
            val up = File(dataDir, "ca.pem").exists() && runCatching {
                Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 200) }
            }.isSuccess
            if (up) break
            check(System.nanoTime() < deadline) { "gateway did not start" }
            Thread.sleep(50) // polling another process's port: nothing to await
        }
        caPem = File(dataDir, "ca.pem").readText()
    }

    /** Mints a dev token with the CLI (the gateway's dev secret). */
    fun mint(user: String): String {
        val p = ProcessBuilder(File(target, "palaver").path, "token", "--user", user, "--data-dir", dataDir.path).start()
        val out = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor() == 0) { p.errorStream.bufferedReader().readText() }
        return out
    }

    override fun close() {
        process.destroy()
        process.waitFor(10, TimeUnit.SECONDS)
        dataDir.deleteRecursively()
    }
}
