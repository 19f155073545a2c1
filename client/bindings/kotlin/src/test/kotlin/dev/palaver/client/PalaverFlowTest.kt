package dev.palaver.client

import kotlinx.coroutines.flow.first
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance
import org.junit.jupiter.api.assertThrows

/** The coroutine layer ([Palaver]) against a real palaver-gateway process. */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class PalaverFlowTest {
    private lateinit var gw: TestGateway

    @BeforeAll
    fun startGateway() {
        PalaverThreads.attach()
        gw = TestGateway()
    }

    @AfterAll
    fun stopGateway() = gw.close()

    private fun tokens(user: String) = object : TokenProvider {
        override fun fetchToken(forceRefresh: Boolean) = gw.mint(user)
    }

    private fun palaver(user: String) = Palaver.connect(
        ClientConfig(address = "127.0.0.1:${gw.port}", serverName = "localhost", trustedCaPem = gw.caPem, deviceId = "flow"),
        tokens(user),
    )

    @Test
    fun `state flows, suspend calls return the server's answers, messages flow in order`() = runBlocking {
        withTimeout(30_000) {
            val olga = palaver("olga")
            val pete = palaver("pete")
            olga.state.first { it is ConnectionState.Connected }
            pete.state.first { it is ConnectionState.Connected }
            val dm = ConversationId.direct("olga", "pete")
            assertEquals(dm, ConversationId("dm:olga:pete"), "ids compare by value")

            val sent = (1..5).map { olga.sendText(dm, "m$it") }
            assertEquals(listOf(1uL, 2uL, 3uL, 4uL, 5uL), sent.map { it.seq })
            assertEquals(sent.map { it.id }.toSet().size, 5)

            // Sent before pete collects: kept until he does.
            val got = pete.messages.take(5).toList()
            assertEquals((1..5).map { "m$it" }, got.map { String(it.body) })

            val page = pete.history(dm, beforeSeq = 0u, limit = 3u)
            assertEquals(listOf(3uL, 4uL, 5uL), page.messages.map { it.seq })
            assertTrue(page.hasMore)

            val group = olga.createGroup("flow", listOf("pete"))
            assertTrue(group.conversationId.startsWith("grp:"), group.conversationId)
            val refused = assertThrows<RefusedException> {
                runBlocking { olga.history(ConversationId("grp:does-not-exist")) }
            }
            assertTrue(refused.error != null, "${refused.message}")
            olga.close(); pete.close()
        }
    }

    @Test
    fun `a channel is created, paged and read live where it is open`() = runBlocking {
        withTimeout(30_000) {
            val rosa = palaver("rosa")
            val sam = palaver("sam")
            rosa.state.first { it is ConnectionState.Connected }
            sam.state.first { it is ConnectionState.Connected }
            val channel = rosa.createChannel("news", listOf("sam", "tia", "uma"), adminsOnlyPost = true)
            assertEquals(ConversationKind.CHANNEL, channel.kind)
            assertEquals(4u, channel.memberCount)
            assertTrue(channel.members.isEmpty(), "a channel's members are paged")
            val id = ConversationId(channel.conversationId)
            val first = rosa.members(id, limit = 2u)
            assertEquals(listOf("rosa", "sam"), first.members.map { it.userId })
            assertTrue(first.hasMore)
            val rest = rosa.members(id, afterUserId = "sam")
            assertEquals(listOf("tia", "uma"), rest.members.map { it.userId })

            sam.openChannel(id, ChannelMode.LIVE)
            sam.events.first { it is ClientEvent.ChannelOpened }
            // tia, a member who is not connected, is mentioned: the server
            // takes the mention (its push needs a token, tested server-side).
            val sent = rosa.sendText(id, "release @tia", mentions = listOf("tia"))
            assertEquals(1uL, sent.seq)
            val got = sam.messages.first { it.conversationId == channel.conversationId }
            assertEquals("release @tia", String(got.body))
            // An announcement channel: members do not post.
            assertThrows<RefusedException> { runBlocking { sam.sendText(id, "may I?") } }
            rosa.close(); sam.close()
        }
    }
}
