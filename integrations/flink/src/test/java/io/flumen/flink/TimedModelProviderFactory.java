package io.flumen.flink;

import java.util.Collection;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentLinkedQueue;

import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.functions.AsyncPredictFunction;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.factories.ModelProviderFactory;
import org.apache.flink.table.ml.AsyncPredictRuntimeProvider;
import org.apache.flink.table.ml.ModelProvider;

/**
 * {@code 'provider' = 'flumen-timed'}: the {@code flumen} provider, its async calls
 * timed, for the benchmark. Flink runs {@code ML_PREDICT}'s async operator at the
 * head of its own task, so a stamp taken in the query before {@code ML_PREDICT}
 * also counts the rows waiting in Flink's network buffers; this one starts when
 * the operator hands the row to the provider. The local cluster runs in the test
 * job's JVM, so the calls land in one static queue.
 */
public final class TimedModelProviderFactory implements ModelProviderFactory {
    /** {@code {start, end}} of every {@code asyncPredict} call, {@link System#nanoTime()}. */
    static final ConcurrentLinkedQueue<long[]> CALLS = new ConcurrentLinkedQueue<>();

    private final FlumenModelProviderFactory flumen = new FlumenModelProviderFactory();

    @Override
    public String factoryIdentifier() {
        return "flumen-timed";
    }

    @Override
    public Set<ConfigOption<?>> requiredOptions() {
        return flumen.requiredOptions();
    }

    @Override
    public Set<ConfigOption<?>> optionalOptions() {
        return flumen.optionalOptions();
    }

    @Override
    public ModelProvider createModelProvider(Context context) {
        return new Timed((AsyncPredictRuntimeProvider) flumen.createModelProvider(context));
    }

    private static final class Timed implements AsyncPredictRuntimeProvider {
        private final AsyncPredictRuntimeProvider inner;

        Timed(AsyncPredictRuntimeProvider inner) {
            this.inner = inner;
        }

        @Override
        public AsyncPredictFunction createAsyncPredictFunction(Context context) {
            return new TimedFunction(inner.createAsyncPredictFunction(context));
        }

        @Override
        public Timed copy() {
            return new Timed((AsyncPredictRuntimeProvider) inner.copy());
        }
    }

    /** Public: the code Flink generates around it refers to it by name. */
    public static final class TimedFunction extends AsyncPredictFunction {
        private static final long serialVersionUID = 1L;
        private final AsyncPredictFunction inner;

        TimedFunction(AsyncPredictFunction inner) {
            this.inner = inner;
        }

        @Override
        public void open(FunctionContext context) throws Exception {
            inner.open(context);
        }

        @Override
        public void close() throws Exception {
            inner.close();
        }

        @Override
        public CompletableFuture<Collection<RowData>> asyncPredict(RowData input) {
            long start = System.nanoTime();
            return inner.asyncPredict(input)
                    .whenComplete((rows, err) -> CALLS.add(new long[] {start, System.nanoTime()}));
        }
    }
}
