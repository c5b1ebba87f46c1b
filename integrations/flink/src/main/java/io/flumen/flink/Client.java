package io.flumen.flink;

import java.net.ConnectException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.time.Duration;
import java.util.Optional;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Sends one request and retries it until it has an answer, a failure not worth another
 * try, or the retry timeout has passed: overload (429, 503) waits for OpenAI's
 * {@code retry-after-ms} or {@code Retry-After} (or the backoff), other 5xx, 408 and
 * a gateway that cannot be reached (down at start, restarted mid-run) back off with
 * full jitter. A row never waits longer than
 * {@code retry-timeout}, which stays below Flink's own async timeout so that a failing
 * row gets its error rather than failing the job.
 *
 * <p>Each attempt is a blocking {@code send} on a thread of this client's own pool
 * (one thread per request in flight, reused), and backoff waits run on this
 * client's timer thread; {@link #close} stops both, and every request still waiting
 * then completes at once with a {@code shutdown} failure. Not {@code sendAsync}: the JDK hands each of its answers to
 * {@code CompletableFuture}'s default executor, which on a machine with two CPUs or
 * fewer (a small TaskManager container) starts a new thread per task — measured
 * here, that doubled the job's CPU per row.
 */
final class Client implements AutoCloseable {
    /** An answer: the parsed JSON, or why there is none. */
    static final class Answer {
        final Object json;
        final String kind;
        final String message;

        private Answer(Object json, String kind, String message) {
            this.json = json;
            this.kind = kind;
            this.message = message;
        }

        static Answer ok(Object json) {
            return new Answer(json, null, null);
        }

        static Answer failed(String kind, String message) {
            return new Answer(null, kind, message);
        }

        boolean ok() {
            return kind == null;
        }
    }

    /** One attempt's failure. */
    private static final class Failure {
        final String kind;
        final String message;
        final boolean retryable;
        final long retryAfterMs;

        Failure(String kind, String message, boolean retryable, long retryAfterMs) {
            this.kind = kind;
            this.message = message;
            this.retryable = retryable;
            this.retryAfterMs = retryAfterMs;
        }
    }

    private final Settings settings;
    private final HttpClient http;
    private final ExecutorService senders;
    private final ScheduledExecutorService timer;

    Client(Settings settings) {
        this.settings = settings;
        this.senders = Executors.newCachedThreadPool(daemon("flumen-http"));
        this.timer = Executors.newSingleThreadScheduledExecutor(daemon("flumen-backoff"));
        // HTTP/1.1: no h2c upgrade attempt on every new connection (neither the gateway
        // nor Triton speaks cleartext HTTP/2 over an upgrade).
        this.http = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofMillis(Math.min(settings.requestTimeoutMs, 10_000)))
                .executor(senders)
                .build();
    }

    /** Stops this client's threads; requests still in flight fail as {@code shutdown}. */
    @Override
    public void close() {
        senders.shutdownNow();
        timer.shutdownNow();
    }

    private static ThreadFactory daemon(String prefix) {
        AtomicInteger n = new AtomicInteger();
        return r -> {
            Thread t = new Thread(r, prefix + "-" + n.incrementAndGet());
            t.setDaemon(true);
            // Not the job's class loader: a lingering thread must not pin it.
            t.setContextClassLoader(null);
            return t;
        };
    }

    /** Posts {@code body} to the model's path, retrying as the settings say. */
    CompletableFuture<Answer> post(String body) {
        return attempt(body, System.nanoTime(), 1, null);
    }

    private CompletableFuture<Answer> attempt(String body, long started, int n, Failure last) {
        HttpRequest.Builder req = HttpRequest.newBuilder(URI.create(settings.endpoint + settings.path()))
                .timeout(Duration.ofMillis(settings.requestTimeoutMs))
                .header("content-type", "application/json")
                .header("x-request-timeout-ms", Long.toString(settings.requestTimeoutMs))
                .POST(HttpRequest.BodyPublishers.ofString(body));
        if (settings.apiKey != null) {
            req.header("authorization", "Bearer " + settings.apiKey);
        }
        HttpRequest request = req.build();
        CompletableFuture<HttpResponse<String>> sent;
        try {
            sent = CompletableFuture.supplyAsync(() -> {
                try {
                    return http.send(request, HttpResponse.BodyHandlers.ofString());
                } catch (java.io.IOException e) {
                    throw new CompletionException(e);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new CompletionException(e);
                }
            }, senders);
        } catch (RuntimeException e) {
            // the pool is shut down: the function is closing
            sent = CompletableFuture.failedFuture(e);
        }
        return sent.handle((resp, err) -> {
                    Failure f = classify(resp, err);
                    if (f == null) {
                        try {
                            return CompletableFuture.completedFuture(Answer.ok(Json.parse(resp.body())));
                        } catch (IllegalArgumentException e) {
                            return CompletableFuture.completedFuture(
                                    Answer.failed("permanent", "unreadable answer: " + e.getMessage()));
                        }
                    }
                    if (!f.retryable) {
                        return CompletableFuture.completedFuture(Answer.failed(f.kind, f.message));
                    }
                    if (senders.isShutdown()) {
                        return CompletableFuture.completedFuture(
                                Answer.failed("shutdown", "the function closed; last error: " + f.message));
                    }
                    long ceiling = Math.min(
                            settings.backoffMaxMs,
                            settings.backoffInitialMs << Math.min(n - 1, 20));
                    long wait = Math.max(f.retryAfterMs, ThreadLocalRandom.current().nextLong(ceiling + 1));
                    long elapsed = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started);
                    if (elapsed + wait > settings.retryTimeoutMs) {
                        return CompletableFuture.completedFuture(Answer.failed(
                                "timeout",
                                "gave up after " + n + " attempt(s) in " + elapsed + " ms (retry-timeout "
                                        + settings.retryTimeoutMs + " ms); last error: " + f.kind + ": "
                                        + f.message));
                    }
                    CompletableFuture<Void> waited = new CompletableFuture<>();
                    try {
                        timer.schedule(() -> waited.complete(null), wait, TimeUnit.MILLISECONDS);
                    } catch (RuntimeException closed) {
                        return CompletableFuture.completedFuture(
                                Answer.failed("shutdown", "the function closed; last error: " + f.message));
                    }
                    return waited.thenCompose(x -> attempt(body, started, n + 1, f));
                })
                .thenCompose(x -> x);
    }

    /** Null for a success; otherwise what failed and whether it is worth another try. */
    private static Failure classify(HttpResponse<String> resp, Throwable err) {
        if (err != null) {
            Throwable cause = err instanceof CompletionException && err.getCause() != null ? err.getCause() : err;
            if (cause instanceof HttpTimeoutException) {
                return new Failure("timeout", "request timed out: " + cause.getMessage(), true, 0);
            }
            String what = cause instanceof ConnectException ? "cannot connect" : "request failed";
            return new Failure("transient", what + ": " + cause, true, 0);
        }
        int status = resp.statusCode();
        if (status >= 200 && status < 300) {
            return null;
        }
        String message = "HTTP " + status + ": " + errorMessage(resp.body());
        if (status == 429 || status == 503) {
            // OpenAI's retry-after-ms, more precise than Retry-After's seconds, first.
            long ra = resp.headers().firstValue("retry-after-ms").flatMap(v -> number(v, 1))
                    .or(() -> resp.headers().firstValue("retry-after").flatMap(v -> number(v, 1000)))
                    .orElse(0L);
            return new Failure("overloaded", message, true, ra);
        }
        if (status == 408 || status == 504) {
            return new Failure("timeout", message, true, 0);
        }
        if (status >= 500) {
            return new Failure("transient", message, true, 0);
        }
        return new Failure(status == 422 || status == 413 ? "invalid_input" : "permanent", message, false, 0);
    }

    /**
     * A header's number of {@code unit} milliseconds ({@code retry-after-ms}: 1;
     * {@code Retry-After}: 1000, whose date form is not parsed: the backoff applies).
     */
    private static Optional<Long> number(String v, double unit) {
        try {
            return Optional.of(Math.max(0, Math.round(Double.parseDouble(v.trim()) * unit)));
        } catch (NumberFormatException e) {
            return Optional.empty();
        }
    }

    /** The message of an OpenAI-style error body, else the body, cut to 300 characters. */
    static String errorMessage(String body) {
        String m = body;
        try {
            Object e = Json.get(Json.parse(body), "error");
            if (e instanceof String) {
                m = (String) e;
            } else if (Json.get(e, "message") instanceof String) {
                m = (String) Json.get(e, "message");
            }
        } catch (IllegalArgumentException ignored) {
            // not JSON: the body itself
        }
        return m.length() > 300 ? m.substring(0, 300) : m;
    }
}
