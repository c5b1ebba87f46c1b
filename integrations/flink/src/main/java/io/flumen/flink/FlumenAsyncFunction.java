package io.flumen.flink;

import java.time.Duration;
import java.util.Collections;
import java.util.List;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.streaming.api.functions.async.ResultFuture;
import org.apache.flink.streaming.api.functions.async.RichAsyncFunction;

/**
 * For DataStream jobs: each text record to a {@code flumen serve} model (or any
 * OpenAI-compatible or KServe v2 endpoint), with the provider's client and options.
 * Use it with {@code AsyncDataStream.orderedWait} or {@code unorderedWait}, with an
 * async timeout above {@code retryTimeout}:
 *
 * <pre>
 * FlumenAsyncFunction embed = FlumenAsyncFunction.builder("http://127.0.0.1:8080", "minilm").build();
 * DataStream&lt;FlumenResult&gt; out =
 *     AsyncDataStream.unorderedWait(texts, embed, 3, TimeUnit.MINUTES, 100);
 * </pre>
 *
 * <p>Each record gets exactly one {@link FlumenResult}: its prediction, or (by default)
 * its error; with {@code failOnError(true)} a failed record fails the job instead. A
 * record still unanswered at the operator's timeout gets a {@code timeout} error too.
 */
public final class FlumenAsyncFunction extends RichAsyncFunction<String, FlumenResult> {
    private static final long serialVersionUID = 1L;
    private final Settings settings;
    private transient Client client;

    private FlumenAsyncFunction(Settings settings) {
        this.settings = settings;
    }

    /** A function for {@code model} at {@code endpoint}, the provider's defaults otherwise. */
    public static Builder builder(String endpoint, String model) {
        return new Builder(endpoint, model);
    }

    @Override
    public void open(OpenContext context) {
        client = new Client(settings);
    }

    @Override
    public void close() {
        if (client != null) {
            client.close();
        }
    }

    @Override
    public void asyncInvoke(String input, ResultFuture<FlumenResult> out) {
        client.post(Requests.text(settings, input)).whenComplete((a, err) -> {
            if (err != null) {
                finish(out, input, "permanent", err.toString());
            } else if (a.ok()) {
                try {
                    out.complete(Collections.singletonList(read(input, a.json)));
                } catch (IllegalArgumentException e) {
                    finish(out, input, "permanent", e.getMessage());
                }
            } else {
                finish(out, input, a.kind, a.message);
            }
        });
    }

    @Override
    public void timeout(String input, ResultFuture<FlumenResult> out) {
        finish(out, input, "timeout", "no answer within the async operator's timeout");
    }

    private void finish(ResultFuture<FlumenResult> out, String input, String kind, String message) {
        if (settings.failOnError) {
            out.completeExceptionally(new FlumenException(kind + ": " + message));
        } else {
            out.complete(Collections.singletonList(new FlumenResult(input, null, null, kind + ": " + message)));
        }
    }

    private FlumenResult read(String input, Object json) {
        Object p = Requests.prediction(settings, json);
        // A one-element KServe BYTES output is that string.
        if (p instanceof List && ((List<?>) p).size() == 1 && ((List<?>) p).get(0) instanceof String) {
            p = ((List<?>) p).get(0);
        }
        if (p instanceof String) {
            return new FlumenResult(input, null, (String) p, null);
        }
        if (p instanceof List) {
            List<?> l = (List<?>) p;
            float[] v = new float[l.size()];
            for (int i = 0; i < v.length; i++) {
                if (!(l.get(i) instanceof Double)) {
                    throw new IllegalArgumentException("not a number in the answer: " + l.get(i));
                }
                v[i] = ((Double) l.get(i)).floatValue();
            }
            return new FlumenResult(input, v, null, null);
        }
        throw new IllegalArgumentException("the answer has no prediction");
    }

    /** The options of {@link FlumenAsyncFunction}, as the provider's {@code CREATE MODEL} options. */
    public static final class Builder {
        private final String endpoint;
        private final String model;
        private Settings.Protocol protocol = Settings.Protocol.OPENAI_EMBEDDINGS;
        private String apiKey;
        private Duration requestTimeout = FlumenModelProviderFactory.REQUEST_TIMEOUT.defaultValue();
        private Duration retryTimeout = FlumenModelProviderFactory.RETRY_TIMEOUT.defaultValue();
        private Duration backoffInitial = FlumenModelProviderFactory.BACKOFF_INITIAL.defaultValue();
        private Duration backoffMax = FlumenModelProviderFactory.BACKOFF_MAX.defaultValue();
        private boolean failOnError;
        private String kserveInput = FlumenModelProviderFactory.KSERVE_INPUT.defaultValue();

        private Builder(String endpoint, String model) {
            this.endpoint = endpoint;
            this.model = model;
        }

        /** {@code openai-embeddings} (default), {@code openai-chat} or {@code kserve}. */
        public Builder protocol(String name) {
            this.protocol = Settings.Protocol.of(name);
            return this;
        }

        /** A bearer token for the endpoint. */
        public Builder apiKey(String key) {
            this.apiKey = key;
            return this;
        }

        /** One request's timeout (default 30 s). */
        public Builder requestTimeout(Duration d) {
            this.requestTimeout = d;
            return this;
        }

        /** How long one record is retried before it fails (default 120 s). */
        public Builder retryTimeout(Duration d) {
            this.retryTimeout = d;
            return this;
        }

        /** The first and the largest backoff ceilings (default 100 ms and 5 s). */
        public Builder backoff(Duration initial, Duration max) {
            this.backoffInitial = initial;
            this.backoffMax = max;
            return this;
        }

        /** Fail the job when a record fails, instead of emitting its error (default false). */
        public Builder failOnError(boolean fail) {
            this.failOnError = fail;
            return this;
        }

        /** KServe: the input tensor's name (default {@code INPUT}). */
        public Builder kserveInput(String name) {
            this.kserveInput = name;
            return this;
        }

        /** The function. */
        public FlumenAsyncFunction build() {
            if (!endpoint.startsWith("http://") && !endpoint.startsWith("https://")) {
                throw new IllegalArgumentException("endpoint: '" + endpoint + "' must start with http:// or https://");
            }
            return new FlumenAsyncFunction(new Settings(endpoint, model, protocol, apiKey, requestTimeout,
                    retryTimeout, backoffInitial, backoffMax, failOnError, kserveInput));
        }
    }
}
