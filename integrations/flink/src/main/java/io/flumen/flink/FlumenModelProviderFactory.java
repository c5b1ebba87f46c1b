package io.flumen.flink;

import java.time.Duration;
import java.util.HashSet;
import java.util.Set;

import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.configuration.ConfigOptions;
import org.apache.flink.configuration.ReadableConfig;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.catalog.ResolvedCatalogModel;
import org.apache.flink.table.factories.FactoryUtil;
import org.apache.flink.table.factories.ModelProviderFactory;
import org.apache.flink.table.ml.ModelProvider;

/**
 * {@code 'provider' = 'flumen'}: models served by {@code flumen serve} (or any
 * OpenAI-compatible or KServe v2 endpoint, Triton included), for {@code ML_PREDICT}.
 *
 * <pre>
 * CREATE MODEL embed
 *   INPUT (text STRING)
 *   OUTPUT (embedding ARRAY&lt;FLOAT&gt;, error STRING)
 *   WITH ('provider' = 'flumen', 'endpoint' = 'http://127.0.0.1:8080', 'model' = 'minilm');
 * </pre>
 */
public final class FlumenModelProviderFactory implements ModelProviderFactory {
    /** The factory's identifier, the value of {@code 'provider'}. */
    public static final String IDENTIFIER = "flumen";

    /** The endpoint's root URL: {@code flumen serve}'s listener, or a model server's. */
    public static final ConfigOption<String> ENDPOINT = ConfigOptions.key("endpoint")
            .stringType()
            .noDefaultValue()
            .withDescription("Root URL of flumen serve (or an OpenAI-compatible or KServe v2 server).");

    /** The model's name at the endpoint. */
    public static final ConfigOption<String> MODEL = ConfigOptions.key("model")
            .stringType()
            .noDefaultValue()
            .withDescription("The model's name at the endpoint.");

    /** {@code openai-embeddings} (default), {@code openai-chat} or {@code kserve}. */
    public static final ConfigOption<String> PROTOCOL = ConfigOptions.key("protocol")
            .stringType()
            .defaultValue("openai-embeddings")
            .withDescription("openai-embeddings, openai-chat or kserve.");

    /** A bearer token for the endpoint. */
    public static final ConfigOption<String> API_KEY = ConfigOptions.key("api-key")
            .stringType()
            .noDefaultValue()
            .withDescription("Bearer token sent to the endpoint.");

    /** One request's timeout (also sent to the gateway as the records' deadline). */
    public static final ConfigOption<Duration> REQUEST_TIMEOUT = ConfigOptions.key("request-timeout")
            .durationType()
            .defaultValue(Duration.ofSeconds(30))
            .withDescription("One request's timeout.");

    /**
     * How long one row may be retried (overload, 5xx, timeouts, an endpoint that cannot
     * be reached) before it fails. A last attempt may start just before it and take up
     * to {@link #REQUEST_TIMEOUT}: keep the two together below the query's async timeout
     * (Flink's default 3 min; the defaults here add up to 2.5 min), or Flink fails the
     * job first.
     */
    public static final ConfigOption<Duration> RETRY_TIMEOUT = ConfigOptions.key("retry-timeout")
            .durationType()
            .defaultValue(Duration.ofSeconds(120))
            .withDescription("How long one row is retried before it fails; with request-timeout, below the async timeout.");

    /** The first backoff's ceiling; it doubles per attempt up to {@link #BACKOFF_MAX}. */
    public static final ConfigOption<Duration> BACKOFF_INITIAL = ConfigOptions.key("backoff.initial")
            .durationType()
            .defaultValue(Duration.ofMillis(100))
            .withDescription("First retry backoff ceiling (full jitter).");

    /** The largest backoff ceiling. */
    public static final ConfigOption<Duration> BACKOFF_MAX = ConfigOptions.key("backoff.max")
            .durationType()
            .defaultValue(Duration.ofSeconds(5))
            .withDescription("Largest retry backoff ceiling.");

    /** {@code emit} (default): a failed row gets a null prediction and its error; {@code fail}: the job fails. */
    public static final ConfigOption<String> ON_ERROR = ConfigOptions.key("on-error")
            .stringType()
            .defaultValue("emit")
            .withDescription("emit: a failed row gets a null prediction and its error column; fail: the job fails.");

    /** KServe: the input tensor's name. */
    public static final ConfigOption<String> KSERVE_INPUT = ConfigOptions.key("kserve.input")
            .stringType()
            .defaultValue("INPUT")
            .withDescription("KServe v2: the input tensor's name.");

    @Override
    public String factoryIdentifier() {
        return IDENTIFIER;
    }

    @Override
    public Set<ConfigOption<?>> requiredOptions() {
        Set<ConfigOption<?>> s = new HashSet<>();
        s.add(ENDPOINT);
        s.add(MODEL);
        return s;
    }

    @Override
    public Set<ConfigOption<?>> optionalOptions() {
        Set<ConfigOption<?>> s = new HashSet<>();
        s.add(PROTOCOL);
        s.add(API_KEY);
        s.add(REQUEST_TIMEOUT);
        s.add(RETRY_TIMEOUT);
        s.add(BACKOFF_INITIAL);
        s.add(BACKOFF_MAX);
        s.add(ON_ERROR);
        s.add(KSERVE_INPUT);
        return s;
    }

    @Override
    public ModelProvider createModelProvider(Context context) {
        FactoryUtil.ModelProviderFactoryHelper helper =
                FactoryUtil.createModelProviderFactoryHelper(this, context);
        helper.validate();
        ReadableConfig o = helper.getOptions();
        String endpoint = o.get(ENDPOINT);
        if (!endpoint.startsWith("http://") && !endpoint.startsWith("https://")) {
            throw new ValidationException("endpoint: '" + endpoint + "' must start with http:// or https://");
        }
        String onError = o.get(ON_ERROR);
        if (!onError.equals("emit") && !onError.equals("fail")) {
            throw new ValidationException("on-error: '" + onError + "' is not emit or fail");
        }
        Settings settings;
        try {
            settings = new Settings(
                    endpoint,
                    o.get(MODEL),
                    Settings.Protocol.of(o.get(PROTOCOL)),
                    o.getOptional(API_KEY).orElse(null),
                    o.get(REQUEST_TIMEOUT),
                    o.get(RETRY_TIMEOUT),
                    o.get(BACKOFF_INITIAL),
                    o.get(BACKOFF_MAX),
                    onError.equals("fail"),
                    o.get(KSERVE_INPUT));
            ResolvedCatalogModel model = context.getCatalogModel();
            Rows rows = Rows.of(settings, model.getResolvedInputSchema(), model.getResolvedOutputSchema());
            return new FlumenModelProvider(settings, rows);
        } catch (IllegalArgumentException e) {
            throw new ValidationException("model " + context.getObjectIdentifier() + ": " + e.getMessage(), e);
        }
    }
}
