package memq.neo4j;

import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.FileVisitResult;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.SimpleFileVisitor;
import java.nio.file.attribute.BasicFileAttributes;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.graphdb.GraphDatabaseService;
import org.neo4j.harness.Neo4j;
import org.neo4j.harness.Neo4jBuilders;
import org.neo4j.io.ByteUnit;
import sun.misc.Signal;

/**
 * Runs an embedded Neo4j (community, via neo4j-harness) with a Bolt endpoint on 127.0.0.1 for memq's tests.
 *
 * <p>Usage: {@code Launcher [BOLT_PORT] [DATA_DIR]}
 *
 * <ul>
 *   <li>BOLT_PORT: TCP port for Bolt; 0 or absent picks a free port (env fallback NEO4J_BOLT_PORT).
 *   <li>DATA_DIR: Neo4j home (databases, transaction logs, logs/debug.log); absent means a temporary directory
 *       that is deleted on exit (env fallback NEO4J_DATA_DIR). A given DATA_DIR is kept, so a second run on
 *       it sees the same data.
 *   <li>Password for user "neo4j": env NEO4J_PASSWORD, else "memq-test-password".
 * </ul>
 *
 * <p>Protocol: when Bolt accepts connections and the password is set, exactly one line
 * {@code NEO4J_READY bolt://127.0.0.1:<port>} is written to stdout. Nothing else is ever written to stdout
 * (System.out is redirected to stderr before Neo4j starts). The process then runs until stdin reaches EOF or
 * it receives SIGTERM/SIGINT, shuts Neo4j down cleanly and exits 0. Startup failures exit 1, bad arguments 2.
 */
public final class Launcher {
    private static final String USER = "neo4j";
    private static final String DEFAULT_PASSWORD = "memq-test-password";
    private static final String READY_PREFIX = "NEO4J_READY ";
    private static final String LOOPBACK = "127.0.0.1";

    private Launcher() {}

    public static void main(String[] args) {
        // Keep stdout for the single READY line; anything Neo4j or its libraries print goes to stderr.
        PrintStream protocolOut = new PrintStream(System.out, false, StandardCharsets.UTF_8);
        System.setOut(System.err);

        int port;
        Path dataDir;
        boolean tempDataDir;
        String password = envOr("NEO4J_PASSWORD", DEFAULT_PASSWORD);
        try {
            port = Integer.parseInt(args.length > 0 ? args[0] : envOr("NEO4J_BOLT_PORT", "0"));
            if (port < 0 || port > 65535) {
                throw new NumberFormatException("out of range: " + port);
            }
            String dir = args.length > 1 ? args[1] : envOr("NEO4J_DATA_DIR", "");
            tempDataDir = dir.isEmpty();
            dataDir = tempDataDir ? Files.createTempDirectory("memq-neo4j-") : Paths.get(dir);
            dataDir = dataDir.toAbsolutePath().normalize();
            Files.createDirectories(dataDir);
        } catch (NumberFormatException e) {
            System.err.println("memq-neo4j: invalid bolt port: " + e.getMessage());
            System.err.println("usage: Launcher [BOLT_PORT (0 = free port)] [DATA_DIR]");
            System.exit(2);
            return;
        } catch (IOException e) {
            System.err.println("memq-neo4j: cannot create data directory: " + e);
            System.exit(2);
            return;
        }
        if (password.isEmpty()) {
            System.err.println("memq-neo4j: NEO4J_PASSWORD must not be empty");
            System.exit(2);
            return;
        }

        CountDownLatch stopRequested = new CountDownLatch(1);
        // SIGTERM/SIGINT: handled ourselves (instead of the JVM's default exit 143/130) so that Neo4j is shut
        // down on the main thread and the process exits 0.
        for (String sig : new String[] {"TERM", "INT"}) {
            try {
                Signal.handle(new Signal(sig), s -> stopRequested.countDown());
            } catch (IllegalArgumentException e) {
                System.err.println("memq-neo4j: cannot handle SIG" + sig + ": " + e.getMessage());
            }
        }

        Path harnessDir = dataDir.resolve("harness");
        deleteRecursively(harnessDir); // leftovers of a run that was killed hard
        Neo4j neo4j;
        long t0 = System.nanoTime();
        try {
            neo4j = Neo4jBuilders.newInProcessBuilder(harnessDir)
                    // The harness puts everything into a random sub-folder of harnessDir and deletes it on close;
                    // pointing neo4j_home at dataDir keeps databases (and logs/debug.log) across runs.
                    .withConfig(GraphDatabaseSettings.neo4j_home, dataDir)
                    .withDisabledServer() // no HTTP/HTTPS connector
                    .withConfig(GraphDatabaseSettings.auth_enabled, true)
                    .withConfig(GraphDatabaseSettings.auth_minimum_password_length, 1)
                    // Tests deliberately try wrong passwords; don't lock the neo4j user out for 5 s after 3 tries.
                    .withConfig(GraphDatabaseSettings.auth_max_failed_attempts, 0)
                    .withConfig(GraphDatabaseSettings.default_listen_address, new SocketAddress(LOOPBACK))
                    .withConfig(GraphDatabaseSettings.default_advertised_address, new SocketAddress(LOOPBACK))
                    .withConfig(BoltConnector.enabled, true)
                    .withConfig(BoltConnector.listen_address, new SocketAddress(LOOPBACK, port))
                    .withConfig(BoltConnector.advertised_address, new SocketAddress(LOOPBACK, port))
                    .withConfig(BoltConnector.encryption_level, BoltConnector.EncryptionLevel.DISABLED)
                    .withConfig(GraphDatabaseSettings.routing_enabled, false)
                    .withConfig(GraphDatabaseSettings.routing_listen_address, new SocketAddress(LOOPBACK, 0))
                    .withConfig(GraphDatabaseSettings.pagecache_memory, ByteUnit.mebiBytes(64))
                    // Default is to fallocate 256 MiB per transaction log (x2 databases) - too much for tests.
                    .withConfig(GraphDatabaseSettings.preallocate_logical_logs, false)
                    .withConfig(GraphDatabaseSettings.logical_log_rotation_threshold, ByteUnit.mebiBytes(32))
                    .withConfig(GraphDatabaseSettings.keep_logical_logs, "2 files")
                    .withConfig(GraphDatabaseSettings.udc_enabled, false)
                    // Internal settings: Bolt's Netty event loops otherwise wait a 5 s quiet period (twice) on
                    // shutdown, which would make every stop take >10 s.
                    .withConfig(GraphDatabaseInternalSettings.netty_server_shutdown_quiet_period, 0)
                    .withConfig(GraphDatabaseInternalSettings.netty_server_shutdown_timeout, Duration.ofSeconds(5))
                    .build();
        } catch (Throwable e) {
            deleteHarnessLogConfig(harnessDir);
            System.err.println("memq-neo4j: Neo4j failed to start (see " + dataDir.resolve("logs/debug.log") + ")");
            e.printStackTrace(System.err);
            cleanup(tempDataDir, dataDir);
            System.exit(1);
            return;
        }
        deleteHarnessLogConfig(harnessDir);

        AtomicBoolean closed = new AtomicBoolean(false);
        Runnable shutdown = () -> {
            if (closed.compareAndSet(false, true)) {
                try {
                    neo4j.close();
                } catch (Throwable e) {
                    System.err.println("memq-neo4j: error while shutting Neo4j down");
                    e.printStackTrace(System.err);
                }
            }
        };
        // Safety net for other JVM exits (System.exit elsewhere, SIGHUP, ...).
        Runtime.getRuntime().addShutdownHook(new Thread(shutdown, "memq-neo4j-shutdown"));

        URI bolt;
        try {
            // The first Cypher statement also warms up the query stack (~2-4 s of the start time).
            setPassword(neo4j, password);
            bolt = neo4j.boltURI();
        } catch (Throwable e) {
            System.err.println("memq-neo4j: Neo4j started but could not be prepared");
            e.printStackTrace(System.err);
            shutdown.run();
            cleanup(tempDataDir, dataDir);
            System.exit(1);
            return;
        }
        int boundPort = bolt.getPort();
        System.err.printf(
                "memq-neo4j: started in %d ms, bolt port %d, data dir %s%n",
                (System.nanoTime() - t0) / 1_000_000, boundPort, dataDir);

        Thread stdinWatcher = new Thread(
                () -> {
                    try {
                        drain(System.in);
                    } finally {
                        stopRequested.countDown();
                    }
                },
                "memq-neo4j-stdin");
        stdinWatcher.setDaemon(true);
        stdinWatcher.start();

        protocolOut.println(READY_PREFIX + "bolt://" + LOOPBACK + ":" + boundPort);
        protocolOut.flush();

        try {
            stopRequested.await();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        System.err.println("memq-neo4j: stopping");
        shutdown.run();
        cleanup(tempDataDir, dataDir);
        System.err.println("memq-neo4j: stopped");
        System.exit(0);
    }

    /**
     * Makes {@code password} the neo4j user's password, without a forced change. On a fresh store the user has
     * the default password "neo4j" with "change required"; on an existing store this is a no-op if the password is
     * already the given one. Runs through the embedded API, which is not subject to authentication.
     */
    private static void setPassword(Neo4j neo4j, String password) {
        GraphDatabaseService system = neo4j.databaseManagementService().database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        try {
            system.executeTransactionally(
                    "ALTER USER " + USER + " SET PLAINTEXT PASSWORD $password CHANGE NOT REQUIRED",
                    Map.of("password", password));
        } catch (RuntimeException e) {
            // Neo4j refuses to "change" a password to the value it already has (store reused across runs).
            String msg = String.valueOf(e.getMessage()) + " " + String.valueOf(e.getCause());
            if (!msg.contains("cannot be the same")) {
                throw e;
            }
            System.err.println("memq-neo4j: password for user neo4j already set");
        }
    }

    private static void drain(InputStream in) {
        byte[] buf = new byte[1024];
        try {
            while (in.read(buf) >= 0) {
                // ignore input; only EOF matters
            }
        } catch (IOException e) {
            // treat a broken stdin like EOF
        }
    }

    private static String envOr(String name, String fallback) {
        String v = System.getenv(name);
        return v == null ? fallback : v;
    }

    private static void cleanup(boolean tempDataDir, Path dataDir) {
        if (tempDataDir) {
            deleteRecursively(dataDir);
        }
    }

    /**
     * The harness writes its user-log config to {@code $java.io.tmpdir/log4j-<random>.xml} on every start and never
     * deletes it (and java.io.tmpdir cannot be redirected at run time: the JDK reads it once at JVM start). Log4j
     * has read it by the time build() returns, so delete ours: the one that names our own harness folder.
     */
    private static void deleteHarnessLogConfig(Path harnessDir) {
        String marker = "\"" + harnessDir + java.io.File.separator;
        try (DirectoryStream<Path> files =
                Files.newDirectoryStream(Paths.get(System.getProperty("java.io.tmpdir")), "log4j-*.xml")) {
            for (Path file : files) {
                try {
                    if (Files.size(file) < 64 * 1024
                            && Files.readString(file, StandardCharsets.UTF_8).contains(marker)) {
                        Files.deleteIfExists(file);
                    }
                } catch (IOException | RuntimeException e) {
                    // not ours, unreadable, or already gone
                }
            }
        } catch (IOException e) {
            System.err.println("memq-neo4j: could not clean up log4j config in java.io.tmpdir: " + e);
        }
    }

    private static void deleteRecursively(Path root) {
        if (!Files.exists(root)) {
            return;
        }
        try {
            Files.walkFileTree(root, new SimpleFileVisitor<>() {
                @Override
                public FileVisitResult visitFile(Path file, BasicFileAttributes attrs) throws IOException {
                    Files.delete(file);
                    return FileVisitResult.CONTINUE;
                }

                @Override
                public FileVisitResult postVisitDirectory(Path dir, IOException exc) throws IOException {
                    Files.delete(dir);
                    return FileVisitResult.CONTINUE;
                }
            });
        } catch (IOException e) {
            System.err.println("memq-neo4j: could not delete " + root + ": " + e);
        }
    }
}
