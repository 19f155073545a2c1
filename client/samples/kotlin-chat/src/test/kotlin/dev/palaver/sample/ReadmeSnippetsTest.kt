package dev.palaver.sample

import java.io.File
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/**
 * Every Kotlin snippet of the SDK's README is code this project compiles:
 * each ```kotlin block must appear, line for line (indentation aside), in a
 * source file of this sample, which `mvn test` has just compiled.
 */
class ReadmeSnippetsTest {
    private val readme = File("../../bindings/kotlin/README.md")
    private val sources = File("src/main/kotlin")

    private fun significant(text: String) = text.lines().map { it.trim() }.filter { it.isNotEmpty() }

    @Test
    fun `every kotlin snippet of the SDK README is compiled here verbatim`() {
        val blocks = Regex("```kotlin\\n(.*?)```", RegexOption.DOT_MATCHES_ALL)
            .findAll(readme.readText())
            .map { significant(it.groupValues[1]) }
            .toList()
        assertTrue(blocks.size >= 2, "found ${blocks.size} kotlin blocks in $readme")
        val files = sources.walk().filter { it.extension == "kt" }.map { it to significant(it.readText()) }.toList()
        for (block in blocks) {
            val home = files.firstOrNull { (_, lines) ->
                lines.indices.any { start -> lines.drop(start).take(block.size) == block }
            }
            assertTrue(home != null, "this README snippet is in no compiled file of the sample:\n${block.joinToString("\n")}")
        }
    }
}
