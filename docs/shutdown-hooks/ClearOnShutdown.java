// Clear this bot's presence sessions when it shuts down (Java 11+, JDK only).
//
// Register it as a shutdown hook:
//   Runtime.getRuntime().addShutdownHook(new Thread(ClearOnShutdown::clearPresenceSessions));
// or call it from your framework's shutdown callback (e.g. Spring's @PreDestroy).
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class ClearOnShutdown {
    static final String REAPER = System.getenv().getOrDefault("PRESENCE_REAPER_URL", "http://127.0.0.1:7740");
    static final String OWNER = System.getenv().getOrDefault("BOT_OWNER", "my-bot");

    /** Returns the daemon's JSON answer: {"cleared": n, "dropped": n, "failed": n, "pending": n}. */
    static String clearPresenceSessions() {
        try {
            HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(REAPER + "/v1/clear-all?wait=true"))
                .timeout(Duration.ofSeconds(35))
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString("{\"owner\": \"" + OWNER + "\"}"))
                .build();
            HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() != 200) {
                throw new RuntimeException("presence-reaper answered " + response.statusCode() + ": " + response.body());
            }
            return response.body();
        } catch (Exception e) {
            throw new RuntimeException("cannot clear presence sessions: " + e.getMessage(), e);
        }
    }

    public static void main(String[] args) {
        String counts = clearPresenceSessions();
        System.out.println(counts);
        System.exit(counts.contains("\"failed\":0") && counts.contains("\"pending\":0") ? 0 : 1);
    }
}
