package io.flumen.flink;

import java.io.Serializable;
import java.time.Duration;

/** A model's settings, from its {@code CREATE MODEL} options: what every subtask needs. */
public final class Settings implements Serializable {
    private static final long serialVersionUID = 1L;

    /** The protocol spoken to the endpoint. */
    public enum Protocol {
        /** OpenAI-compatible {@code /v1/embeddings}: a STRING in, {@code ARRAY<FLOAT>} out. */
        OPENAI_EMBEDDINGS("openai-embeddings"),
        /** OpenAI-compatible {@code /v1/chat/completions}: a STRING in, a STRING out. */
        OPENAI_CHAT("openai-chat"),
        /** KServe v2 {@code /v2/models/{model}/infer}: one tensor row in, one out. */
        KSERVE("kserve");

        final String name;

        Protocol(String name) {
            this.name = name;
        }

        static Protocol of(String name) {
            for (Protocol p : values()) {
                if (p.name.equals(name)) {
                    return p;
                }
            }
            throw new IllegalArgumentException(
                    "protocol: '" + name + "' is not openai-embeddings, openai-chat or kserve");
        }
    }

    final String endpoint;
    final String model;
    final Protocol protocol;
    final String apiKey;
    final long requestTimeoutMs;
    final long retryTimeoutMs;
    final long backoffInitialMs;
    final long backoffMaxMs;
    final boolean failOnError;
    final String kserveInput;

    Settings(
            String endpoint,
            String model,
            Protocol protocol,
            String apiKey,
            Duration requestTimeout,
            Duration retryTimeout,
            Duration backoffInitial,
            Duration backoffMax,
            boolean failOnError,
            String kserveInput) {
        this.endpoint = endpoint.endsWith("/") ? endpoint.substring(0, endpoint.length() - 1) : endpoint;
        this.model = model;
        this.protocol = protocol;
        this.apiKey = apiKey;
        this.requestTimeoutMs = requestTimeout.toMillis();
        this.retryTimeoutMs = retryTimeout.toMillis();
        this.backoffInitialMs = backoffInitial.toMillis();
        this.backoffMaxMs = backoffMax.toMillis();
        this.failOnError = failOnError;
        this.kserveInput = kserveInput;
    }

    /** The path requests go to, under the endpoint. */
    String path() {
        switch (protocol) {
            case OPENAI_EMBEDDINGS: return "/v1/embeddings";
            case OPENAI_CHAT: return "/v1/chat/completions";
            default: return "/v2/models/" + model + "/infer";
        }
    }
}
