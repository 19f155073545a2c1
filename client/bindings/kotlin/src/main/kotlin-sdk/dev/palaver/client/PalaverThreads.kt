package dev.palaver.client

import com.sun.jna.Callback
import com.sun.jna.CallbackThreadInitializer
import com.sun.jna.Native

/**
 * Written by hand beside the generated bindings (`src/main/kotlin` stays
 * exactly what UniFFI generates).
 *
 * The SDK calls the app from two threads of its own: `palaver-events`
 * (every [EventListener.onEvent], the [LogSink], the [ClientStore] writes)
 * and `palaver-io` ([TokenProvider.fetchToken]). By default JNA attaches
 * such a native thread to the JVM for one callback and detaches it after,
 * so each callback runs on a new `java.lang.Thread` (`Thread-1` …
 * `Thread-2070`): thread-locals, profilers and "am I on the events
 * thread" checks all break. [attach] keeps each attached for its whole
 * life, as one named daemon thread.
 */
object PalaverThreads {
    @Volatile
    private var attached = false

    /**
     * Call it first, before any other SDK call (in `Application.onCreate`):
     * JNA reads these settings when the SDK's native library is loaded,
     * which the first SDK call does; later calls change nothing.
     * Idempotent; [palaverClient] calls it too (enough when creating the
     * client is the app's first SDK call).
     */
    @JvmStatic
    fun attach() {
        if (attached) return
        synchronized(this) {
            if (attached) return
            val events = CallbackThreadInitializer(true, false, "palaver-events")
            listOf<Callback>(
                uniffiCallbackInterfaceEventListener.`onEvent`,
                uniffiCallbackInterfaceLogSink.`log`,
                uniffiCallbackInterfaceClientStore.`saveCursor`,
                uniffiCallbackInterfaceClientStore.`removeOutgoing`,
            ).forEach { Native.setCallbackThreadInitializer(it, events) }
            Native.setCallbackThreadInitializer(
                uniffiCallbackInterfaceTokenProvider.`fetchToken`,
                CallbackThreadInitializer(true, false, "palaver-io"),
            )
            attached = true
        }
    }
}

/**
 * A [PalaverClient] whose callbacks run on one `palaver-events` thread
 * (see [PalaverThreads]). Same arguments as the constructor.
 */
fun palaverClient(
    config: ClientConfig,
    tokens: TokenProvider,
    listener: EventListener,
    store: ClientStore?,
): PalaverClient {
    PalaverThreads.attach()
    return PalaverClient(config, tokens, listener, store)
}
