// Clear this bot's presence sessions when it shuts down (C#, .NET's HttpClient).
//
// In an ASP.NET Core / Bot Framework app, call ClearPresenceSessionsAsync from
// IHostApplicationLifetime.ApplicationStopping or IHostedService.StopAsync.
using System;
using System.Net.Http;
using System.Text;
using System.Threading.Tasks;

public static class ClearOnShutdown
{
    static readonly HttpClient Http = new HttpClient { Timeout = TimeSpan.FromSeconds(35) };

    /// Returns the daemon's JSON answer: {"cleared": n, "dropped": n, "failed": n, "pending": n}.
    public static async Task<string> ClearPresenceSessionsAsync(string reaper, string owner)
    {
        var body = new StringContent("{\"owner\": \"" + owner + "\"}", Encoding.UTF8, "application/json");
        using (var response = await Http.PostAsync(reaper + "/v1/clear-all?wait=true", body))
        {
            var text = await response.Content.ReadAsStringAsync();
            if ((int)response.StatusCode != 200)
                throw new Exception("presence-reaper answered " + (int)response.StatusCode + ": " + text);
            return text;
        }
    }

    public static int Main()
    {
        var reaper = Environment.GetEnvironmentVariable("PRESENCE_REAPER_URL") ?? "http://127.0.0.1:7740";
        var owner = Environment.GetEnvironmentVariable("BOT_OWNER") ?? "my-bot";
        var counts = ClearPresenceSessionsAsync(reaper, owner).GetAwaiter().GetResult();
        Console.WriteLine(counts);
        return counts.Contains("\"failed\":0") && counts.Contains("\"pending\":0") ? 0 : 1;
    }
}
